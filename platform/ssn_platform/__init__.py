"""ssn_platform: the platform around the SuperSimpleNet model package.

Object storage (``ssn_platform.storage``), versioned datasets in S3 with a node-local cache
(``ssn_platform.datasets``) and helpers for the local stack (``ssn_platform.stackenv``); training, tuning, registry
and serving modules live beside them. Import submodules explicitly: this package imports nothing on its own.
"""
