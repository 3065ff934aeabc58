/*
 * Test-only stand-in for libgupnp-igd-1.0.so.4 (UPnP port mapping, unused on loopback).
 *
 * Why: on Debian 12, simple-whip-client links libsoup2 while libnice links libgupnp-igd,
 * which pulls in libsoup3; loading webrtcbin then aborts with "libsoup2 symbols detected.
 * Using libsoup2 and libsoup3 in the same process is not supported." libnice only needs
 * the four symbols below and treats a NULL from gupnp_simple_igd_thread_new() as "no UPnP",
 * so the interop tests put this stub first on LD_LIBRARY_PATH for whip-client only.
 */
#include <stddef.h>

/* Plain C types (no glib headers needed): GType is a gsize; G_TYPE_OBJECT is fundamental 20 << 2. */
unsigned long gupnp_simple_igd_get_type(void) { return 20UL << 2; }

void *gupnp_simple_igd_thread_new(void) { return NULL; }

void gupnp_simple_igd_add_port(void *self, const char *protocol, unsigned external_port,
                               const char *local_ip, unsigned local_port, unsigned lease_duration,
                               const char *description) {
  (void)self; (void)protocol; (void)external_port; (void)local_ip; (void)local_port;
  (void)lease_duration; (void)description;
}

void gupnp_simple_igd_remove_port_local(void *self, const char *protocol,
                                        const char *local_ip, unsigned short local_port) {
  (void)self; (void)protocol; (void)local_ip; (void)local_port;
}
