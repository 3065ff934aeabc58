//! Log setup: human-readable by default, JSON on request, filter from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,str0m=warn,webrtc=warn,turn=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
