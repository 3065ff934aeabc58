//! Catching a session's DTLS-SRTP export, so the direct send path can seal with it.
//!
//! str0m 0.25 derives its SRTP keys inside the session and exposes none of them.
//! Its crypto is pluggable per session though ([`RtcConfig::set_crypto_provider`]):
//! this module's provider hands out the real DTLS instances wrapped in one that
//! passes every output through unchanged and keeps a copy of the keying material
//! when the handshake exports it. The wrapper is attached only to sessions built
//! inside [`build_capturing`]; every other session gets the plain instance.

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
        let inner = self.inner.new_dtls(cert, now, dtls_version, mtu)?;
        Ok(match PENDING.with(|p| p.borrow_mut().take()) {
            Some(slot) => Box::new(Capturing { inner, slot }),
            None => inner,
        })
    }

    fn is_test(&self) -> bool {
        self.inner.is_test()
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
