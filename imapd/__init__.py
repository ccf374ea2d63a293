"""imapd: mail access for standard clients, IMAP4rev1 (imapd.imap) and POP3 (imapd.pop3)."""
