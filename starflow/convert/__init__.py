"""Import of official checkpoints into starflow models (safetensors + JSON config)."""
from starflow.convert.tarflow import config_from_tarflow, convert_state_dict, from_tarflow  # noqa: F401
