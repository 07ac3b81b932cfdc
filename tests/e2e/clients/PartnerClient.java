// A partner's Java 17 client, as partners write it: java.net.http.HttpClient over an SSLContext whose key manager
// comes from KeyManagerFactory.getDefaultAlgorithm() (SunX509) on a PKCS12 keystore, and whose trust manager holds
// the provider's server CA.  The key manager, not this program, picks which client certificate to send: from the
// certificate authorities the server names in its CertificateRequest, or, when it names none, the first entry that
// fits the key type.
//
// Compiled by the test suite into a temporary directory (javac PartnerClient.java) and run once per proxy mode:
//
//   java -cp DIR PartnerClient SCRIPT
//
// SCRIPT holds tab-separated lines, run in order:
//   keystore  OUT  PASSWORD  ALIAS=IN.p12  [ALIAS=IN.p12 ...]
//       writes the PKCS12 keystore OUT holding the key entry of each IN.p12 (password PASSWORD) under ALIAS, in
//       the order given: how a partner collects the certificates of several providers in one keystore.
//   get  NAME  URL  KEYSTORE  PASSWORD  TRUST_PEM  PROTOCOLS
//       one GET with a new HttpClient (so a new TLS connection); PROTOCOLS e.g. TLSv1.3,TLSv1.2.
// Output, one line per get, tab-separated: NAME, then "status" CODE PROTOCOL BASE64(BODY) (PROTOCOL as the TLS
// session names it, e.g. TLSv1.3) or "error" BASE64(MESSAGES),
// where MESSAGES is the exception chain, one "Class: message" per line.

import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.Key;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.time.Duration;
import java.util.Base64;
import java.util.Collections;
import java.util.List;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.TrustManagerFactory;

public final class PartnerClient {
    public static void main(String[] args) throws Exception {
        List<String> lines = Files.readAllLines(Path.of(args[0]), StandardCharsets.UTF_8);
        for (String line : lines) {
            if (line.isBlank()) {
                continue;
            }
            String[] f = line.split("\t");
            switch (f[0]) {
                case "keystore" -> keystore(f);
                case "get" -> System.out.println(get(f));
                default -> throw new IllegalArgumentException("unknown command: " + f[0]);
            }
            System.out.flush();
        }
        System.exit(0);  // HttpClient keeps selector threads; nothing else is pending
    }

    private static KeyStore load(String path, char[] password) throws Exception {
        KeyStore ks = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(path)) {
            ks.load(in, password);
        }
        return ks;
    }

    private static void keystore(String[] f) throws Exception {
        char[] password = f[2].toCharArray();
        KeyStore out = KeyStore.getInstance("PKCS12");
        out.load(null, password);
        for (int i = 3; i < f.length; i++) {
            String[] pair = f[i].split("=", 2);
            KeyStore in = load(pair[1], password);
            String alias = Collections.list(in.aliases()).get(0);
            Key key = in.getKey(alias, password);
            Certificate[] chain = in.getCertificateChain(alias);
            out.setKeyEntry(pair[0], key, password, chain);
        }
        try (FileOutputStream os = new FileOutputStream(f[1])) {
            out.store(os, password);
        }
    }

    private static String get(String[] f) {
        String name = f[1];
        try {
            char[] password = f[4].toCharArray();
            KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
            kmf.init(load(f[3], password), password);

            KeyStore trust = KeyStore.getInstance("PKCS12");
            trust.load(null, null);
            try (InputStream in = new FileInputStream(f[5])) {
                int n = 0;
                for (Certificate c : CertificateFactory.getInstance("X.509").generateCertificates(in)) {
                    trust.setCertificateEntry("server-ca-" + n++, c);
                }
            }
            TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            tmf.init(trust);

            SSLContext ctx = SSLContext.getInstance("TLS");
            ctx.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
            SSLParameters params = ctx.getDefaultSSLParameters();
            params.setProtocols(f[6].split(","));
            HttpClient client = HttpClient.newBuilder().sslContext(ctx).sslParameters(params)
                    .connectTimeout(Duration.ofSeconds(10)).build();
            HttpRequest request = HttpRequest.newBuilder(URI.create(f[2])).timeout(Duration.ofSeconds(20)).GET()
                    .build();
            HttpResponse<byte[]> resp = client.send(request, HttpResponse.BodyHandlers.ofByteArray());
            String protocol = resp.sslSession().map(javax.net.ssl.SSLSession::getProtocol).orElse("none");
            return name + "\tstatus\t" + resp.statusCode() + "\t" + protocol + "\t"
                    + Base64.getEncoder().encodeToString(resp.body());
        } catch (Exception e) {
            StringBuilder sb = new StringBuilder();
            for (Throwable t = e; t != null; t = t.getCause()) {
                sb.append(t.getClass().getName()).append(": ").append(t.getMessage()).append('\n');
            }
            byte[] messages = sb.toString().getBytes(StandardCharsets.UTF_8);
            return name + "\terror\t" + Base64.getEncoder().encodeToString(messages);
        }
    }
}
