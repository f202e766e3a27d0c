"""starflow: latent normalizing flows (STARFlow / TARFlow) and peer systems on one harness."""
from starflow.config import FlowConfig, TrainConfig
from starflow.flow.condition import Condition
from starflow.flow.model import STARFlow
from starflow.pipeline import StarflowPipeline

__version__ = "0.1.0"
__all__ = ["STARFlow", "FlowConfig", "TrainConfig", "Condition", "StarflowPipeline"]
