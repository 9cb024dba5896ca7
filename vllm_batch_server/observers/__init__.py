"""What watches: metrics, the monitor and webhooks read the store and the event log; nothing below imports them."""
