"""`python -m imapd`: run the imapd daemon alone (what the systemd unit starts)."""

from runtime.daemon import daemon_main


def main() -> None:
    daemon_main("imapd")


if __name__ == "__main__":
    main()
