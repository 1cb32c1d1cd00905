"""pacs-ai-node: the DICOM listener service (receive → spool → index → complete → queue → infer → results → dispatch)."""
