//! The configuration error: a leaf, so every module that owns a section can name its faults
//! without importing the composed `Config` (which imports every section).

/// A configuration problem, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// The process exit code for a configuration error (`EX_USAGE`, sysexits.h).
    pub const EXIT_CODE: u8 = 64;

    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}
