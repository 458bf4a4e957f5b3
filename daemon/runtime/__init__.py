"""The daemon's process: wiring, supervision, staged stop, outage and priority rules."""
