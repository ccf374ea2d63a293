"""What every daemon shares, below them all: running daemons (supervisor and
workers), metrics. No module here imports ``mtad``, ``imapd``, ``httpapi`` or
``mailctl`` by name; daemons and ``mailctl`` import from here."""
