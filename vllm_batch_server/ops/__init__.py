"""Running as a service: the systemd unit and its notify protocol."""
