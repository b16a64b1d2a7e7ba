"""The study's hyper-parameter sweep: trials, backends (local processes, Ray), selection and reports."""
