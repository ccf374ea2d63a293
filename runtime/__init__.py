"""What every daemon shares, below them all: running daemons (supervisor and
workers), listeners (per-IP limits, port sharing), metrics and their endpoint.
No module here imports ``mtad``, ``imapd``, ``httpapi`` or ``mailctl`` by
name; daemons and ``mailctl`` import from here."""
