"""`python -m httpapi`: run the httpapi daemon alone (what the systemd unit starts)."""

from runtime.daemon import daemon_main


def main() -> None:
    daemon_main("httpapi")


if __name__ == "__main__":
    main()
