//! system_run
