//! Edge configuration: TOML file, CLI overrides, validation.
