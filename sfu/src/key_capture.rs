//! Catching a session's DTLS-SRTP export, so the direct send path can seal with it.
//!
//! str0m 0.25 derives its SRTP keys inside the session and exposes none of them.
//! Its crypto is pluggable per session though ([`RtcConfig::set_crypto_provider`]):
//! this module's provider hands out the real DTLS instances wrapped in one that
//! passes every output through unchanged and keeps a copy of the keying material
//! when the handshake exports it. The wrapper is attached only to sessions built
//! inside [`build_capturing`]; every other session gets the plain instance.
//!
//! The instances themselves are dimpl's, as str0m's own provider makes them, but
//! from one configuration built once: building a dimpl configuration validates the
//! crypto provider, test key exchanges on every group included (P-384 among them),
//! which str0m's provider repeats for every session: a millisecond or more of the
//! media thread per join, the largest single cost of a join storm's setup.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use str0m::config::{CryptoProvider, DtlsCert};
use str0m::crypto::dtls::{
    DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::CryptoError;
use str0m::{Rtc, RtcConfig};

use crate::srtp_seal::Exported;

/// Where a session's export lands once its handshake is done.
pub type KeySlot = Arc<Mutex<Option<Exported>>>;

thread_local! {
    /// The slot for the DTLS instance the session under construction will create.
    static PENDING: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// The process's DTLS provider with capturing instances.
#[derive(Debug)]
struct CapturingProvider {
    inner: &'static dyn DtlsProvider,
}

impl DtlsProvider for CapturingProvider {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.inner.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner: Box<dyn DtlsInstance> = if self.inner.is_test() {
            // str0m's test mode seeds dimpl's RNG; leave that to str0m.
            self.inner.new_dtls(cert, now, dtls_version, mtu)?
        } else {
            let config = shared_config(mtu)?;
            Box::new(Dimpl(match dtls_version {
                DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert.clone(), now),
                DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert.clone(), now),
                DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert.clone(), now),
                v => return Err(CryptoError::Other(format!("unsupported DTLS version: {v}"))),
            }))
        };
        Ok(match PENDING.with(|p| p.borrow_mut().take()) {
            Some(slot) => Box::new(Capturing { inner, slot }),
            None => inner,
        })
    }

    fn is_test(&self) -> bool {
        self.inner.is_test()
    }
}

/// The dimpl configuration for sessions with `mtu` (str0m's settings: no server
/// cookie, ICE has verified the return route), built and validated once per MTU.
fn shared_config(mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
    type ByMtu = Vec<(Option<usize>, Arc<dimpl::Config>)>;
    static CONFIGS: OnceLock<Mutex<ByMtu>> = OnceLock::new();
    let configs = CONFIGS.get_or_init(Default::default);
    let mut configs = configs
        .lock()
        .map_err(|_| CryptoError::Other("DTLS config cache poisoned".into()))?;
    if let Some((_, c)) = configs.iter().find(|(m, _)| *m == mtu) {
        return Ok(c.clone());
    }
    let mut builder = dimpl::Config::builder().use_server_cookie(false);
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    let config = Arc::new(
        builder
            .build()
            .map_err(|e| CryptoError::Other(format!("dimpl config creation failed: {e}")))?,
    );
    // Bounded: str0m asks with its one configured MTU (or none).
    if configs.len() < 8 {
        configs.push((mtu, config.clone()));
    }
    Ok(config)
}

/// A dimpl DTLS instance as str0m drives it.
struct Dimpl(dimpl::Dtls);

impl std::fmt::Debug for Dimpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dimpl")
    }
}

impl DtlsInstance for Dimpl {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

/// A DTLS instance that keeps a copy of the keying material it exports.
#[derive(Debug)]
struct Capturing {
    inner: Box<dyn DtlsInstance>,
    slot: KeySlot,
}

impl DtlsInstance for Capturing {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let active = self.inner.is_active();
        let out = self.inner.poll_output(buf);
        if let DtlsOutput::KeyingMaterial(material, profile) = &out {
            if let Ok(mut slot) = self.slot.lock() {
                *slot = Some(Exported {
                    material: material.to_vec(),
                    profile: *profile,
                    active,
                });
            }
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.inner.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}

/// The crypto provider every session of the process uses (str0m's default, with
/// the capturing DTLS factory): one per process, so its `'static` parts are built once.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let base = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(str0m::crypto::from_feature_flags);
        let dtls: &'static CapturingProvider = Box::leak(Box::new(CapturingProvider {
            inner: base.dtls_provider,
        }));
        Arc::new(CryptoProvider {
            dtls_provider: dtls,
            ..base
        })
    })
    .clone()
}

/// Builds a session whose DTLS export will be copied into the returned slot.
pub fn build_capturing(cfg: RtcConfig, now: Instant) -> (Rtc, KeySlot) {
    let slot: KeySlot = Arc::new(Mutex::new(None));
    PENDING.with(|p| *p.borrow_mut() = Some(slot.clone()));
    let rtc = cfg.set_crypto_provider(provider()).build(now);
    // Never leave the slot for an unrelated session built later on this thread.
    PENDING.with(|p| p.borrow_mut().take());
    (rtc, slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One validated dimpl configuration per MTU, reused by every session.
    #[test]
    fn the_dtls_configuration_is_built_once_per_mtu() {
        let a = shared_config(None).expect("config");
        let b = shared_config(None).expect("config");
        assert!(Arc::ptr_eq(&a, &b));
        let c = shared_config(Some(1100)).expect("config");
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(&c, &shared_config(Some(1100)).expect("config")));
        // And the instances made from it are dimpl's, ready to be driven by str0m.
        let p = provider();
        let cert = p.dtls_provider.generate_certificate().expect("certificate");
        let mut d = p
            .dtls_provider
            .new_dtls(&cert, Instant::now(), DtlsVersion::Dtls12, None)
            .expect("instance");
        d.set_active(true);
        assert!(d.is_active() && !d.is_closed());
    }
}
