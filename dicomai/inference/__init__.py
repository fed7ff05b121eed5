"""Inference: claim a QUEUED job, read and prepare its images, run the model, write results."""
