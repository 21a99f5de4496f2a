"""voxarc DICOM-aware persistence: index, blob store, staging, assembly, compaction, reconstruction."""
