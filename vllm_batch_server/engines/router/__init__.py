"""Many engines behind one: windows, prefix affinity, failover (router.py has the whole story)."""
