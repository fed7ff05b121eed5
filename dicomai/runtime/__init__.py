"""Runtime: the daemon that composes the stages, the scheduler's periodic jobs, leadership."""
