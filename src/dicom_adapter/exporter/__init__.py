"""dicom-export: Pub/Sub → WADO-RS → C-STORE or STOW-RS."""
