"""bigmodelvis: visualise the structure of big models (re-exported from opendelta)."""
