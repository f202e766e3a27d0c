"""``python -m starflow.tasks.editing``: train (or fine-tune) an edit model."""
from starflow.tasks.editing.train import train_main

train_main()
