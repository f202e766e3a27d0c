"""Import of official checkpoints into starflow models (safetensors + JSON config)."""
from starflow.convert.starflow import config_from_starflow, from_starflow  # noqa: F401
from starflow.convert.tarflow import config_from_tarflow, convert_state_dict, from_tarflow  # noqa: F401
