"""`python -m dicom_adapter` runs dicom-import."""

from dicom_adapter.cli import import_main

import_main()
