"""Operating the daemon: the events log, metrics, stats, monitor, dashboard and report."""
