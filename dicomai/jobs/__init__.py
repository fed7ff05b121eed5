"""Jobs: a study generation's states, the policy that moves it between them, and its rows."""
