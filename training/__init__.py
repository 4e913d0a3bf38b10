"""Fine-tune pretrained transformer encoders as text classifiers, on one device or many (DDP)."""
