"""The delivery half of the pipeline, shared by every entry point that takes a
message in (SMTP on MX and submission, the HTTP API's send): address syntax,
trace and header helpers, route and deliver. It sits below the daemons so
that ``mtad`` and ``httpapi`` both use it without importing each other."""
