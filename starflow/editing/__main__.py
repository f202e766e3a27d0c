"""``python -m starflow.editing``: train (or fine-tune) an edit model."""
from starflow.editing.train import train_main

train_main()
