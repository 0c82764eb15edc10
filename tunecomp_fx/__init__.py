"""tunecomp-fx: joint fine-tuning and compression as a torch.fx pass pipeline."""
