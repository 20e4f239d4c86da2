"""The lab's own code: the synthetic visual world, the nano model's training and its evaluation."""
