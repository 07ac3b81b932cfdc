/*
 * client_cert_shim.c - LD_PRELOAD library that gives wrk a TLS client certificate.
 *
 * wrk has no option for a client certificate, and every target of this benchmark refuses a handshake
 * without one.  wrk builds exactly one SSL_CTX at start-up, so wrapping SSL_CTX_new is enough: we call the
 * real constructor, then load the certificate chain and key named in the environment into the new context
 * (and optionally cap the protocol version, so the handshake matches the NGINX config: TLS 1.2 only).
 *
 * Environment (read on every SSL_CTX_new call):
 *   MTLS_BENCH_CERT      PEM file: client certificate (chain allowed); unset = leave the context untouched
 *   MTLS_BENCH_KEY       PEM file: its private key (default: MTLS_BENCH_CERT)
 *   MTLS_BENCH_TLS_MAX   "1.2" or "1.3": highest protocol version the client offers (default: library's)
 *
 * A bad file is fatal (exit 2): a load generator that silently runs without a certificate would measure
 * handshake failures, not a proxy.
 *
 * Build: gcc -O2 -shared -fPIC -o client_cert_shim.so client_cert_shim.c -ldl -lssl -lcrypto
 * Use:   LD_PRELOAD=./client_cert_shim.so MTLS_BENCH_CERT=client.crt MTLS_BENCH_KEY=client.key wrk ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

typedef SSL_CTX *(*ssl_ctx_new_fn)(const SSL_METHOD *);

static void die(const char *what, const char *file)
{
    fprintf(stderr, "client_cert_shim: %s %s\n", what, file ? file : "");
    ERR_print_errors_fp(stderr);
    exit(2);
}

static int version_named(const char *name)
{
    if (name == NULL || *name == '\0')
        return 0;
    if (strcmp(name, "1.2") == 0)
        return TLS1_2_VERSION;
    if (strcmp(name, "1.3") == 0)
        return TLS1_3_VERSION;
    die("MTLS_BENCH_TLS_MAX must be 1.2 or 1.3, got", name);
    return 0;
}

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
{
    /* RTLD_NEXT: the definition that would have been used without us, i.e. libssl's. */
    ssl_ctx_new_fn real = (ssl_ctx_new_fn)dlsym(RTLD_NEXT, "SSL_CTX_new");
    if (real == NULL)
        die("cannot find the real SSL_CTX_new:", dlerror());

    SSL_CTX *ctx = real(method);
    if (ctx == NULL)
        return NULL;

    const char *cert = getenv("MTLS_BENCH_CERT");
    const char *key = getenv("MTLS_BENCH_KEY");
    if (cert != NULL && *cert != '\0') {
        if (key == NULL || *key == '\0')
            key = cert;
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
            die("cannot load certificate", cert);
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
            die("cannot load private key", key);
        if (SSL_CTX_check_private_key(ctx) != 1)
            die("key does not match certificate", cert);
    }

    int max_version = version_named(getenv("MTLS_BENCH_TLS_MAX"));
    if (max_version != 0 && SSL_CTX_set_max_proto_version(ctx, max_version) != 1)
        die("cannot cap the TLS version", getenv("MTLS_BENCH_TLS_MAX"));
    return ctx;
}
