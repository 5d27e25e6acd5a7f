"""Training: stage configs, the shared loop, training tasks and the three stage runners."""
