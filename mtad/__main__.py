"""`python -m mtad`: run the mtad daemon alone (what the systemd unit starts)."""

from runtime.daemon import daemon_main


def main() -> None:
    daemon_main("mtad")


if __name__ == "__main__":
    main()
