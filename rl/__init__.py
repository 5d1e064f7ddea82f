"""robodiff RL adaptation of frozen imitation policies (see the RL adaptation issue)."""
