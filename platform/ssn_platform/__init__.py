"""ssn_platform: the platform around the SuperSimpleNet model package.

Object storage (``ssn_platform.storage``; object keys and s3:// URIs in ``ssn_platform.s3keys``), versioned datasets
in S3 (the format in ``ssn_platform.manifest``, publishing in ``ssn_platform.ingest``) read back through a node-local
cache (``ssn_platform.datasets``, ``ssn_platform.cache``) and helpers for the local stack (``ssn_platform.stackenv``);
training, tuning, registry and serving modules live beside them. Import submodules explicitly: this package imports
nothing on its own.
"""
