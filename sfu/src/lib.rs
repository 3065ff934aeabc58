//! SFU core
