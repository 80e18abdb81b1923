"""Format level, no networking: Part-10 files, transfer syntaxes, redaction, transcoding."""
