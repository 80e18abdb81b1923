"""dicom-adapter: a bridge between DIMSE and DICOMweb."""
