// Keys and certificates end to end: keys made in a real SoftHSM token and
// used through the filesystem and the CLI, checked by openssl and
// pkcs11-tool; certificates issued by vault CAs, merged and imported,
// served by a real nginx across a renewal, and renewed and rotated by the
// daemon's own policies. Every operation is audited; callers without the
// permission get EACCES and a record.
#include <catch2/catch.hpp>

#include <filesystem>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

std::string sha256(const std::string& data)
{
    std::string out(32, '\0');
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), reinterpret_cast<unsigned char*>(out.data()), &len, EVP_sha256(), nullptr);
    return out;
}

// An operation through a file: open read-write, write the input, read the
// result until EOF from the same fd.
Outcome operate(const std::string& path, const std::string& input, std::size_t chunk = 4096)
{
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return {errno, {}};
    if (::write(fd, input.data(), input.size()) != static_cast<ssize_t>(input.size())) {
        const int err = errno;
        ::close(fd);
        return {err, {}};
    }
    std::string out;
    char buf[4096];
    for (;;) {
        const ssize_t n = ::read(fd, buf, std::min(chunk, sizeof buf));
        if (n < 0) {
            const int err = errno;
            ::close(fd);
            return {err, {}};
        }
        if (n == 0)
            break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    if (::close(fd) != 0)
        return {errno, {}};
    return {0, out};
}

Outcome access_of(const std::string& path, int mask) { return {::access(path.c_str(), mask) == 0 ? 0 : errno, {}}; }

void put(const std::string& path, const std::string& data)
{
    std::ofstream out(path, std::ios::binary);
    out << data;
    REQUIRE(out.good());
}

std::string cli(const Mount& m, const std::string& args) { return m.binary + " " + args + " --state " + m.state; }

int free_port()
{
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    return ntohs(a.sin_port);
}



}  // namespace

TEST_CASE("keys live in the token and sign and decrypt through files and the CLI, as openssl checks", "[fs][keys]")
{
    Mount m;
    TestUser signer("ks"), reader("kr");
    REQUIRE(make_dir(m.path("apps")).err == 0);
    REQUIRE(write_file(m.path("apps/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(signer.uid) +
                                                   " get,sign,decrypt\nallow uid:" + std::to_string(reader.uid) +
                                                   " get\n")
                .err == 0);
    auto r = shell(cli(m, "key create apps/signer --type ec-p256") + " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    REQUIRE(shell(cli(m, "key create apps/rsa --type rsa-2048 --ops sign,verify,decrypt,encrypt")).err == 0);
    CHECK(m.last_audit("key_create")["secret"] == ".keys/rsa");

    CHECK(ok(list_dir(m.path("apps/.keys"))) == "rsa\nsigner");
    CHECK(ok(list_dir(m.path("apps/.keys/signer"))) == "public.jwk\npublic.pem\nsign.ES256");
    CHECK(ok(list_dir(m.path("apps/.keys/rsa"))) ==
          "decrypt.RSA-OAEP\ndecrypt.RSA-OAEP-256\ndecrypt.RSA1_5\npublic.jwk\npublic.pem\nsign.PS256\nsign.PS384\n"
          "sign.PS512\nsign.RS256\nsign.RS384\nsign.RS512");
    const std::string jwk = ok(as(reader, [&] { return read_file(m.path("apps/.keys/signer/public.jwk")); }));
    const auto j = nlohmann::json::parse(jwk);
    CHECK(j["kty"] == "EC");
    CHECK(j["crv"] == "P-256");
    CHECK(j["kid"] == "apps/.keys/signer@1");

    const std::string data = "payload to sign";
    put(m.root + "/data", data);
    const std::string pub = m.path("apps/.keys/signer/public.pem");

    SECTION("an app signs through sign.ES256; openssl verifies it against public.pem")
    {
        const auto sig = as(signer, [&] { return operate(m.path("apps/.keys/signer/sign.ES256"), sha256(data)); });
        REQUIRE(sig.err == 0);
        put(m.root + "/sig", sig.data);
        // Read in small pieces, the result is the same length and verifies too.
        const auto pieces = as(signer, [&] { return operate(m.path("apps/.keys/signer/sign.ES256"), sha256(data), 7); });
        REQUIRE(pieces.err == 0);
        CHECK(pieces.data.size() >= 70);
        put(m.root + "/sig7", pieces.data);
        CHECK(shell("openssl dgst -sha256 -verify " + pub + " -signature " + m.root + "/sig7 " + m.root + "/data")
                  .err == 0);
        const auto rec = m.last_audit("key_sign", signer.uid);
        CHECK(rec["result"] == "ok");
        CHECK(rec["attribute"] == "ES256");
        CHECK(rec["version"] == 1);
        CHECK(shell("openssl dgst -sha256 -verify " + pub + " -signature " + m.root + "/sig " + m.root + "/data")
                  .err == 0);
        // Bytes of another message do not verify.
        put(m.root + "/other", "other payload");
        CHECK(shell("openssl dgst -sha256 -verify " + pub + " -signature " + m.root + "/sig " + m.root +
                    "/other >/dev/null 2>&1")
                  .err != 0);
    }
    SECTION("a digest of the wrong size fails the write; a caller without sign gets EACCES and a record")
    {
        CHECK(as(signer, [&] { return operate(m.path("apps/.keys/signer/sign.ES256"), std::string(33, 'x')); }).err ==
              EINVAL);
        // ... and is audited, once, with the bytes given.
        const auto big = m.last_audit("key_sign", signer.uid);
        INFO(big.dump());
        REQUIRE(big.is_object());
        REQUIRE(big.contains("reason"));
        CHECK(big["decision"] == "allow");
        CHECK(big["result"] == "EINVAL");
        CHECK(big["bytes"] == 33);
        CHECK(big["attribute"] == "ES256");
        CHECK(big["reason"] == "more input than ES256 takes (at most 32 bytes)");
        CHECK(as(reader, [&] { return operate(m.path("apps/.keys/signer/sign.ES256"), sha256(data)); }).err == EACCES);
        const auto rec = m.last_audit("key_sign", reader.uid);
        CHECK(rec["decision"] == "deny");
        CHECK(rec["result"] == "EACCES");
        // access() says what the policy allows, not what the mode bits show.
        const std::string op = m.path("apps/.keys/signer/sign.ES256");
        CHECK(as(signer, [&] { return access_of(op, R_OK | W_OK); }).err == 0);
        CHECK(as(reader, [&] { return access_of(op, W_OK); }).err == EACCES);
        CHECK(as(reader, [&] { return access_of(m.path("apps/.keys/signer/public.pem"), R_OK); }).err == 0);
        CHECK(as(reader, [&] { return access_of(m.path("apps/.keys/signer/public.pem"), W_OK); }).err == EACCES);
        // Nothing is created among the keys.
        CHECK(write_file(m.path("apps/.keys/new"), "x").err == EPERM);
        CHECK(write_file(m.path("apps/.keys"), "x").err == EISDIR);
        // Opening for reading only is not an operation.
        CHECK(as(signer, [&] { return read_file(m.path("apps/.keys/signer/sign.ES256")); }).err == EINVAL);
        // Public files are read-only.
        CHECK(as(signer, [&] { return write_file(m.path("apps/.keys/signer/public.pem"), "x", O_WRONLY); }).err ==
              EACCES);
    }
    SECTION("the CLI signs (DER, or JOSE r|s with --raw) and verifies locally")
    {
        REQUIRE(shell(cli(m, "key sign apps/signer --alg ES256 --in " + m.root + "/data --out " + m.root + "/cli.sig"))
                    .err == 0);
        CHECK(shell("openssl dgst -sha256 -verify " + pub + " -signature " + m.root + "/cli.sig " + m.root + "/data")
                  .err == 0);
        REQUIRE(shell(cli(m, "key sign apps/signer --alg ES256 --raw --in " + m.root + "/data --out " + m.root +
                             "/raw.sig"))
                    .err == 0);
        CHECK(slurp(m.root + "/raw.sig").size() == 64);
        r = shell(cli(m, "key verify apps/signer --alg ES256 --raw --in " + m.root + "/data --signature " + m.root +
                         "/raw.sig"));
        CHECK(r.err == 0);
        CHECK(r.data == "Verified OK\n");
        put(m.root + "/other", "tampered");
        r = shell(cli(m, "key verify apps/signer --alg ES256 --in " + m.root + "/other --signature " + m.root +
                         "/cli.sig"));
        CHECK(r.err == 1);
        CHECK(r.data == "Verification failure\n");
        // RSA: PS256 through the CLI, checked by openssl with PSS.
        REQUIRE(shell(cli(m, "key sign apps/rsa --alg PS256 --in " + m.root + "/data --out " + m.root + "/ps.sig"))
                    .err == 0);
        CHECK(shell("openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest -verify " +
                    m.path("apps/.keys/rsa/public.pem") + " -signature " + m.root + "/ps.sig " + m.root + "/data")
                  .err == 0);
        // An algorithm the key does not offer.
        r = shell(cli(m, "key sign apps/signer --alg RS256 --in " + m.root + "/data --out " + m.root + "/x") + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data.find("(EINVAL)") != std::string::npos);
    }
    SECTION("decrypt.* opens what openssl pkeyutl encrypted with public.pem; garbage is EINVAL")
    {
        const std::string rsa_pub = m.path("apps/.keys/rsa/public.pem");
        put(m.root + "/plain", "a wrapped key");
        for (const auto& [alg, opts] :
             {std::pair<std::string, std::string>{"RSA-OAEP-256",
                                                  "-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 "
                                                  "-pkeyopt rsa_mgf1_md:sha256"},
              {"RSA-OAEP", "-pkeyopt rsa_padding_mode:oaep"},
              {"RSA1_5", "-pkeyopt rsa_padding_mode:pkcs1"}}) {
            INFO(alg);
            REQUIRE(shell("openssl pkeyutl -encrypt -pubin -inkey " + rsa_pub + " " + opts + " -in " + m.root +
                          "/plain -out " + m.root + "/ct")
                        .err == 0);
            const auto plain = as(signer, [&] {
                return operate(m.path("apps/.keys/rsa/decrypt." + alg), slurp(m.root + "/ct"));
            });
            REQUIRE(plain.err == 0);
            CHECK(plain.data == "a wrapped key");
            CHECK(m.last_audit("key_decrypt", signer.uid)["result"] == "ok");
        }
        CHECK(as(signer, [&] { return operate(m.path("apps/.keys/rsa/decrypt.RSA-OAEP"), std::string(256, 'z')); })
                  .err == EINVAL);
        CHECK(m.last_audit("key_decrypt", signer.uid)["result"] == "EINVAL");
        // The CLI decrypts too.
        REQUIRE(shell(cli(m, "key decrypt apps/rsa --alg RSA1_5 --in " + m.root + "/ct --out " + m.root + "/out"))
                    .err == 0);
        CHECK(slurp(m.root + "/out") == "a wrapped key");
        // An EC key has no decrypt files; no unwrapkey, no unwrap files.
        CHECK(as(signer, [&] { return stat_path(m.path("apps/.keys/signer/decrypt.RSA-OAEP")); }).err == ENOENT);
        CHECK(as(signer, [&] { return stat_path(m.path("apps/.keys/rsa/unwrap.RSA-OAEP")); }).err == ENOENT);
    }
    SECTION("without decrypt or unwrap a caller is refused by the files and the CLI, each with a deny record")
    {
        REQUIRE(shell(cli(m, "key create apps/wrap --type rsa-2048 --ops decrypt,unwrapkey,encrypt,wrapkey")).err == 0);
        const std::string ct(256, 'c');
        const auto refused = [&](const TestUser& who, const std::string& file, const std::string& op) {
            INFO(file << " as " << who.name);
            CHECK(as(who, [&] { return operate(m.path(file), ct); }).err == EACCES);
            const auto rec = m.last_audit(op, who.uid);
            CHECK(rec["decision"] == "deny");
            CHECK(rec["result"] == "EACCES");
        };
        refused(reader, "apps/.keys/wrap/decrypt.RSA-OAEP", "key_decrypt");
        refused(reader, "apps/.keys/wrap/unwrap.RSA-OAEP", "key_unwrap");
        refused(signer, "apps/.keys/wrap/unwrap.RSA-OAEP", "key_unwrap");  // decrypt is not unwrap
        // The CLI: an admin whose policy in the vault lacks them.
        REQUIRE(write_file(m.path("apps/.policy"), "allow uid:0 get,list,set,manage,sign\nallow uid:" +
                                                       std::to_string(signer.uid) + " get,sign,decrypt\n")
                    .err == 0);
        put(m.root + "/ct", ct);
        for (const std::string verb : {"decrypt", "unwrap"}) {
            INFO(verb);
            r = shell(cli(m, "key " + verb + " apps/wrap --alg RSA-OAEP --in " + m.root + "/ct --out " + m.root +
                             "/out") +
                      " 2>&1");
            CHECK(r.err == 1);
            CHECK(r.data.find("(EACCES)") != std::string::npos);
            const auto rec = m.last_audit("key_" + verb, 0);
            CHECK(rec["decision"] == "deny");
            CHECK(rec["result"] == "EACCES");
        }
        REQUIRE(write_file(m.path("apps/.policy"), "allow uid:0 *\n").err == 0);
    }
    SECTION("rotation makes a new version; NAME@N keeps signing with the old one")
    {
        const std::string v1 = slurp(pub);
        r = shell(cli(m, "key rotate apps/signer"));
        REQUIRE(r.err == 0);
        CHECK(r.data == "rotated apps/signer: version 2\n");
        CHECK(slurp(pub) != v1);
        CHECK(slurp(m.path("apps/.keys/signer@1/public.pem")) == v1);
        const auto sig = as(signer, [&] { return operate(m.path("apps/.keys/signer@1/sign.ES256"), sha256(data)); });
        REQUIRE(sig.err == 0);
        put(m.root + "/sig1", sig.data);
        CHECK(shell("openssl dgst -sha256 -verify " + m.path("apps/.keys/signer@1/public.pem") + " -signature " +
                    m.root + "/sig1 " + m.root + "/data")
                  .err == 0);
        CHECK(m.last_audit("key_sign", signer.uid)["version"] == 1);
        // A disabled version does nothing.
        REQUIRE(set_xattr(m.path("apps/.keys/signer@1"), "user.vault.enabled", "false").err == 0);
        CHECK(as(signer, [&] { return operate(m.path("apps/.keys/signer@1/sign.ES256"), sha256(data)); }).err ==
              EACCES);
        CHECK(ok(get_xattr(m.path("apps/.keys/signer"), "user.vault.version")) == "2");
        CHECK(ok(get_xattr(m.path("apps/.keys/signer"), "user.vault.type")) == "ec-p256");
        CHECK(ok(get_xattr(m.path("apps/.keys/signer"), "user.vault.ops")) == "sign,verify");
        // Tags, as for secrets.
        REQUIRE(set_xattr(m.path("apps/.keys/signer"), "user.vault.tag.team", "payments").err == 0);
        CHECK(ok(get_xattr(m.path("apps/.keys/signer"), "user.vault.tag.team")) == "payments");
        CHECK(ok(list_xattr(m.path("apps/.keys/signer"))).find("user.vault.tag.team") != std::string::npos);
        CHECK(as(reader, [&] { return set_xattr(m.path("apps/.keys/signer"), "user.vault.tag.x", "y"); }).err == EACCES);
        CHECK(set_xattr(m.path("apps/.keys/signer"), "user.vault.type", "rsa-2048").err == EPERM);
    }
    SECTION("pkcs11-tool sees the keys as sensitive and never extractable")
    {
        r = shell("SOFTHSM2_CONF=" + m.state + "/softhsm2.conf pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so "
                  "--token-label vaultfs --login --pin \"$(cat " + m.state + "/pin)\" --list-objects --type privkey "
                  "2>&1");
        INFO(r.data);
        REQUIRE(r.err == 0);
        for (const std::string label : {"vaultfs-key:apps/signer", "vaultfs-key:apps/rsa"}) {
            const auto at = r.data.find("label:      " + label);
            REQUIRE(at != std::string::npos);
            const auto block = r.data.substr(at, r.data.find("Private Key Object", at) - at);
            CHECK(block.find("sensitive") != std::string::npos);
            CHECK(block.find("never extractable") != std::string::npos);
        }
    }
    CHECK(m.verify().err == 0);
}

TEST_CASE("certificates: vault CAs, exportable or token keys, merge, import; openssl checks every chain",
          "[fs][certificates]")
{
    Mount m;
    TestUser viewer("cv"), getter("cg");
    REQUIRE(make_dir(m.path("pki")).err == 0);
    REQUIRE(write_file(m.path("pki/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(viewer.uid) +
                                                  " certificates\nallow uid:" + std::to_string(getter.uid) + " get\n")
                .err == 0);
    const std::string certs = m.path("pki/.certs");
    REQUIRE(shell(cli(m, "cert create pki/ca --subject CN=Test-CA --ca --days 3650 --key ec-p384")).err == 0);
    auto r = shell(cli(m, "cert create pki/web --subject CN=web.test --san DNS:web.test,IP:127.0.0.1 --days 30 "
                          "--exportable --issuer pki/ca"));
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK(r.data == "created pki/web: version 1, issued\n");
    REQUIRE(shell(cli(m, "cert create pki/token --subject CN=token.test --key rsa-2048 --issuer pki/ca")).err == 0);
    CHECK(m.last_audit("cert_create")["secret"] == ".certs/token");

    // The chain of a certificate a vault CA issued verifies against the CA.
    CHECK(shell("openssl verify -CAfile " + certs + "/ca/cert.pem " + certs + "/web/cert.pem").err == 0);
    CHECK(shell("openssl verify -CAfile " + certs + "/web/ca.pem " + certs + "/token/cert.pem").err == 0);
    CHECK(shell("openssl x509 -in " + certs + "/web/cert.pem -noout -ext subjectAltName | grep -q "
                "'DNS:web.test, IP Address:127.0.0.1'")
              .err == 0);
    // The exportable key matches its certificate; the bundle opens as PKCS#12.
    CHECK(shell("test \"$(openssl pkey -in " + certs + "/web/key.pem -pubout)\" = \"$(openssl x509 -in " + certs +
                "/web/cert.pem -noout -pubkey)\"")
              .err == 0);
    CHECK(shell("openssl pkcs12 -in " + certs + "/web/bundle.p12 -passin pass: -nokeys | grep -q 'subject=CN = web.test'")
              .err == 0);
    CHECK(ok(list_dir(certs + "/web")) == "bundle.p12\nbundle.pem\nca.pem\ncert.pem\nchain.pem\nkey.pem\nstatus");
    // A key in the token is never a file.
    CHECK(ok(list_dir(certs + "/token")) == "ca.pem\ncert.pem\nchain.pem\nstatus");
    CHECK(as(getter, [&] { return read_file(certs + "/token/key.pem"); }).err == ENOENT);
    // Its certificate is on the token beside the key (libp11), for token-aware software.
    r = shell("SOFTHSM2_CONF=" + m.state + "/softhsm2.conf pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so "
              "--token-label vaultfs --login --pin \"$(cat " + m.state + "/pin)\" --list-objects --type cert 2>&1");
    CHECK(r.data.find("label:      vaultfs-cert:pki/token") != std::string::npos);
    CHECK(r.data.find("subject:    DN: CN=token.test") != std::string::npos);
    CHECK(ok(as(getter, [&] { return read_file(certs + "/token/status"); })).rfind("status: issued\n", 0) == 0);
    // Issuing with a vault CA needs sign on it: refused, and recorded on the CA.
    REQUIRE(write_file(m.path("pki/.policy"), "allow uid:0 *\ndeny uid:0 sign ca\nallow uid:" +
                                                  std::to_string(viewer.uid) + " certificates\nallow uid:" +
                                                  std::to_string(getter.uid) + " get\n")
                .err == 0);
    r = shell(cli(m, "cert create pki/unsigned --subject CN=unsigned.test --key rsa-2048 --issuer pki/ca") + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data.find("(EACCES)") != std::string::npos);
    const auto issue = m.last_audit("cert_issue");
    CHECK(issue["decision"] == "deny");
    CHECK(issue["result"] == "EACCES");
    CHECK(issue["secret"] == ".certs/ca");
    CHECK(as(getter, [&] { return stat_path(certs + "/unsigned"); }).err == ENOENT);
    REQUIRE(write_file(m.path("pki/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(viewer.uid) +
                                                  " certificates\nallow uid:" + std::to_string(getter.uid) +
                                                  " get\n")
                .err == 0);
    // A certificate never outlives the CA that issued it, whatever --days says.
    REQUIRE(shell(cli(m, "cert create pki/shortca --subject CN=Short-CA --ca --days 10 --key ec-p256")).err == 0);
    REQUIRE(shell(cli(m, "cert create pki/long --subject CN=long.test --key ec-p256 --days 365 --issuer pki/shortca"))
                .err == 0);
    const auto end_of = [&](const std::string& name) {
        return shell("date -d \"$(openssl x509 -noout -enddate -in " + certs + "/" + name +
                     "/cert.pem | cut -d= -f2)\" +%s")
            .data;
    };
    const std::string ca_end = end_of("shortca"), leaf_end = end_of("long");
    REQUIRE_FALSE(ca_end.empty());
    CHECK(std::stoll(leaf_end) <= std::stoll(ca_end));
    CHECK(std::stoll(leaf_end) < std::stoll(shell("date -d '+300 days' +%s").data));
    // A version outside its window (user.vault.expires, not_before) serves
    // no file but its status, read by its number as by its name; audited.
    REQUIRE(set_xattr(certs + "/token@1", "user.vault.expires", "2001-01-01T00:00:00Z").err == 0);
    CHECK(as(getter, [&] { return read_file(certs + "/token@1/cert.pem"); }).err == EKEYEXPIRED);
    auto late = m.last_audit("cert_get", getter.uid);
    CHECK(late["result"] == "EKEYEXPIRED");
    CHECK(late["version"] == 1);
    CHECK(as(getter, [&] { return read_file(certs + "/token/chain.pem"); }).err == EKEYEXPIRED);
    CHECK(as(getter, [&] { return read_file(certs + "/token@1/status"); }).err == 0);
    REQUIRE(shell("setfattr -x user.vault.expires " + certs + "/token@1").err == 0);
    REQUIRE(set_xattr(certs + "/token@1", "user.vault.not_before", "2099-01-01T00:00:00Z").err == 0);
    CHECK(as(getter, [&] { return read_file(certs + "/token@1/cert.pem"); }).err == EKEYEXPIRED);
    REQUIRE(shell("setfattr -x user.vault.not_before " + certs + "/token@1").err == 0);
    CHECK(as(getter, [&] { return read_file(certs + "/token@1/cert.pem"); }).err == 0);

    // `certificates` reads the public files, never the key.
    CHECK(ok(as(viewer, [&] { return read_file(certs + "/web/chain.pem"); })).find("BEGIN CERTIFICATE") !=
          std::string::npos);
    CHECK(as(viewer, [&] { return read_file(certs + "/web/key.pem"); }).err == EACCES);
    CHECK(as(viewer, [&] { return access_of(certs + "/web/key.pem", R_OK); }).err == EACCES);
    CHECK(as(viewer, [&] { return access_of(certs + "/web/cert.pem", R_OK); }).err == 0);
    auto rec = m.last_audit("cert_get", viewer.uid);
    CHECK(rec["decision"] == "deny");
    CHECK(rec["attribute"] == "key.pem");
    CHECK(ok(as(getter, [&] { return read_file(certs + "/web/key.pem"); })).find("BEGIN PRIVATE KEY") !=
          std::string::npos);
    CHECK(m.last_audit("cert_get", getter.uid)["result"] == "ok");

    SECTION("an issuer the caller cannot sign with, or that is no CA, is refused")
    {
        r = shell(cli(m, "cert create pki/bad --subject CN=bad --issuer pki/web") + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data.find("not an issued CA certificate") != std::string::npos);
        r = shell(cli(m, "cert create pki/bad --subject nonsense") + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data.find("(EINVAL)") != std::string::npos);
        CHECK(as(viewer, [&] { return stat_path(certs + "/bad"); }).err == ENOENT);
    }
    SECTION("a certificate's name is unique among secrets, keys and certificates")
    {
        REQUIRE(write_file(m.path("pki/db"), "secret").err == 0);
        r = shell(cli(m, "cert create pki/db --subject CN=db") + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data.find("(EEXIST)") != std::string::npos);
        CHECK(write_file(m.path("pki/web"), "x").err == EEXIST);
        REQUIRE(shell(cli(m, "key create pki/signer")).err == 0);
        r = shell(cli(m, "cert create pki/signer --subject CN=x") + " 2>&1");
        CHECK(r.data.find("(EEXIST)") != std::string::npos);
    }
    SECTION("unknown issuer: csr.pem, signed elsewhere, merged")
    {
        REQUIRE(shell(cli(m, "cert create pki/ext --subject CN=ext.test --issuer unknown --exportable")).err == 0);
        CHECK(ok(list_dir(certs + "/ext")) == "csr.pem\nstatus");
        CHECK(ok(read_file(certs + "/ext/status")) == "status: pending\n");
        const std::string d = m.root;
        REQUIRE(shell("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " + d +
                      "/ext-ca.key -out " + d + "/ext-ca.pem -subj /CN=Ext-CA -days 5 2>/dev/null && openssl x509 "
                      "-req -in " + certs + "/ext/csr.pem -CA " + d + "/ext-ca.pem -CAkey " + d +
                      "/ext-ca.key -CAcreateserial -out " + d + "/signed.pem -days 2 2>/dev/null && cat " + d +
                      "/ext-ca.pem >> " + d + "/signed.pem")
                    .err == 0);
        // Someone else's certificate does not merge.
        r = shell(cli(m, "cert merge pki/ext " + certs + "/web/cert.pem") + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data.find("not for") != std::string::npos);
        r = shell(cli(m, "cert merge pki/ext " + d + "/signed.pem"));
        REQUIRE(r.err == 0);
        CHECK(r.data == "merged pki/ext: version 1, issued\n");
        CHECK(m.last_audit("cert_merge")["result"] == "ok");
        CHECK(shell("openssl verify -CAfile " + certs + "/ext/ca.pem " + certs + "/ext/cert.pem").err == 0);
        CHECK(shell("test \"$(openssl pkey -in " + certs + "/ext/key.pem -pubout)\" = \"$(openssl x509 -in " + certs +
                    "/ext/cert.pem -noout -pubkey)\"")
                  .err == 0);
    }
    SECTION("backups carry keys and certificates; a restore into another vault re-binds them")
    {
        REQUIRE(shell(cli(m, "key create pki/signer --type ec-p384")).err == 0);
        const std::string d = m.root;
        REQUIRE(shell(cli(m, "backup pki -o " + d + "/pki.backup")).err == 0);
        const std::string doc = slurp(d + "/pki.backup");
        CHECK(doc.find("BEGIN PRIVATE KEY") == std::string::npos);  // sealed, never plain
        CHECK(doc.find("\"objects\"") != std::string::npos);
        // Into the same vault: everything is there already, nothing changes.
        auto again = shell(cli(m, "restore " + d + "/pki.backup") + " 2>&1");
        CHECK(again.err == 1);
        CHECK(again.data.find("exists in pki") != std::string::npos);
        auto r2 = shell(cli(m, "restore " + d + "/pki.backup --into pki2"));
        INFO(r2.data);
        REQUIRE(r2.err == 0);
        CHECK(r2.data.find("restored .certs/web\n") != std::string::npos);
        CHECK(r2.data.find("restored .keys/signer\n") != std::string::npos);
        const std::string copy = m.path("pki2/.certs");
        CHECK(slurp(copy + "/web/key.pem") == slurp(certs + "/web/key.pem"));
        CHECK(slurp(copy + "/web/chain.pem") == slurp(certs + "/web/chain.pem"));
        CHECK(slurp(copy + "/token/cert.pem") == slurp(certs + "/token/cert.pem"));
        CHECK(ok(list_dir(copy + "/token")) == "ca.pem\ncert.pem\nchain.pem\nstatus");
        // The restored key is the same token key: its signature verifies with the original's public half.
        put(d + "/data", "restored");
        REQUIRE(shell(cli(m, "key sign pki2/signer --alg ES384 --in " + d + "/data --out " + d + "/sig")).err == 0);
        CHECK(shell("openssl dgst -sha384 -verify " + m.path("pki/.keys/signer/public.pem") + " -signature " + d +
                    "/sig " + d + "/data")
                  .err == 0);
        bool recorded = false;
        for (const auto& rec : m.audit())
            recorded |= rec["op"] == "restore" && rec["vault"] == "pki2" && rec["secret"] == ".keys/signer";
        CHECK(recorded);
    }
    SECTION("import takes PEM and PKCS#12; each import is a version")
    {
        const std::string d = m.root;
        REQUIRE(shell("openssl req -x509 -newkey rsa:2048 -nodes -keyout " + d + "/imp.key -out " + d +
                      "/imp.pem -subj /CN=imported -days 5 2>/dev/null && cat " + d + "/imp.key " + d + "/imp.pem > " +
                      d + "/imp.both && openssl pkcs12 -export -inkey " + d + "/imp.key -in " + d +
                      "/imp.pem -passout pass:s3cret -out " + d + "/imp.p12 && echo s3cret > " + d + "/pw")
                    .err == 0);
        REQUIRE(shell(cli(m, "cert import pki/imported " + d + "/imp.both")).err == 0);
        r = shell(cli(m, "cert import pki/imported " + d + "/imp.p12 --password-file " + d + "/pw"));
        REQUIRE(r.err == 0);
        CHECK(r.data == "imported pki/imported: version 2, issued\n");
        CHECK(shell("openssl pkey -in " + certs + "/imported/key.pem").data ==
              shell("openssl pkey -in " + d + "/imp.key").data);
        CHECK(shell("openssl x509 -in " + certs + "/imported@1/cert.pem").data ==
              shell("openssl x509 -in " + d + "/imp.pem").data);
        r = shell(cli(m, "cert import pki/other " + d + "/imp.p12") + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data.find("wrong password") != std::string::npos);
        CHECK(m.last_audit("cert_import")["result"] == "EINVAL");
    }
    CHECK(m.verify().err == 0);
}

TEST_CASE("nginx serves an exportable certificate from the vault, and the renewed one once the on_change hook "
          "sends it SIGHUP",
          "[fs][certificates][nginx][hooks]")
{
    // nginx's prefix is made first: the hook in vaultfs.conf names its pid file.
    std::string prefix = (std::filesystem::temp_directory_path() / "vaultfs-nginx-XXXXXX").string();
    REQUIRE(::mkdtemp(prefix.data()) != nullptr);
    struct Prefix {
        std::string path;
        ~Prefix()
        {
            std::error_code ec;
            std::filesystem::remove_all(path, ec);
        }
    } prefix_dir{prefix};
    MountOptions o;
    o.config_lines = {"on_change = web/site signal root " + prefix + "/nginx.pid SIGHUP"};
    Mount m(o);
    REQUIRE(make_dir(m.path("web")).err == 0);
    REQUIRE(shell(cli(m, "cert create web/site --subject CN=site.test --san DNS:site.test --days 30 --exportable"))
                .err == 0);
    // The create fired the hook, before nginx runs: a failure, audited,
    // that changed nothing else.
    REQUIRE(eventually(5, [&] {
        for (const auto& rec : m.audit())
            if (rec["op"] == "hook")
                return true;
        return false;
    }));
    CHECK(m.last_audit("hook")["version"] == 1);
    CHECK(m.last_audit("hook")["result"] == "EIO");
    CHECK(m.last_audit("hook")["reason"] == "no pid in " + prefix + "/nginx.pid: No such file or directory");
    const int port = free_port();
    REQUIRE(shell("mkdir -p " + prefix + "/logs").err == 0);
    put(prefix + "/nginx.conf", "user root;\nworker_processes 1;\npid " + prefix + "/nginx.pid;\nerror_log " +
                                    prefix + "/logs/error.log;\nevents { worker_connections 16; }\nhttp {\n"
                                    "  access_log off;\n  server {\n    listen 127.0.0.1:" + std::to_string(port) +
                                    " ssl;\n    ssl_certificate " + m.path("web/.certs/site/chain.pem") +
                                    ";\n    ssl_certificate_key " + m.path("web/.certs/site/key.pem") +
                                    ";\n    location / { return 200 \"ok\\n\"; }\n  }\n}\n");
    struct Nginx {
        std::string prefix;
        ~Nginx()
        {
            const std::string pid = slurp(prefix + "/nginx.pid");
            if (!pid.empty())
                ::kill(std::stoi(pid), SIGQUIT);
            std::this_thread::sleep_for(std::chrono::milliseconds(300));
        }
    } nginx{prefix};
    auto r = shell("nginx -p " + prefix + " -c " + prefix + "/nginx.conf 2>&1");
    INFO(r.data << slurp(prefix + "/logs/error.log"));
    REQUIRE(r.err == 0);
    const auto served_serial = [&] {
        return shell("echo | openssl s_client -connect 127.0.0.1:" + std::to_string(port) +
                     " -servername site.test 2>/dev/null | openssl x509 -noout -serial")
            .data;
    };
    const std::string serial_of_v1 = shell("openssl x509 -noout -serial -in " + m.path("web/.certs/site/cert.pem")).data;
    REQUIRE(eventually(10, [&] { return !served_serial().empty(); }));
    CHECK(served_serial() == serial_of_v1);
    // nginx's own reads are in the trail.
    bool key_read_by_nginx = false;
    for (const auto& rec : m.audit())
        key_read_by_nginx |= rec["op"] == "cert_get" && rec["attribute"] == "key.pem" && rec["result"] == "ok" &&
                             rec.value("exe", std::string()).find("nginx") != std::string::npos;
    CHECK(key_read_by_nginx);

    REQUIRE(shell(cli(m, "cert renew web/site")).err == 0);
    CHECK(m.last_audit("cert_renew")["version"] == 2);
    const std::string serial_of_v2 = shell("openssl x509 -noout -serial -in " + m.path("web/.certs/site/cert.pem")).data;
    REQUIRE(serial_of_v2 != serial_of_v1);
    // The renewal's commit fires the hook: nginx reloads and serves version 2.
    CHECK(eventually(10, [&] { return served_serial() == serial_of_v2; }));
    const auto hook = m.last_audit("hook");
    CHECK(hook["result"] == "ok");
    CHECK(hook["secret"] == ".certs/site");
    CHECK(hook["version"] == 2);
    CHECK(hook["rule"] == "web/site signal root " + prefix + "/nginx.pid SIGHUP");
    const std::string nginx_pid = slurp(prefix + "/nginx.pid");
    CHECK(hook["reason"] == "sent SIGHUP to " + nginx_pid.substr(0, nginx_pid.find('\n')) + " (root)");
    std::size_t firings = 0;
    for (const auto& rec : m.audit())
        firings += rec["op"] == "hook";
    CHECK(firings == 2);  // the create's, and the renewal's
    // Readers of NAME@1 keep what they had.
    CHECK(shell("openssl x509 -noout -serial -in " + m.path("web/.certs/site@1/cert.pem")).data == serial_of_v1);
}

TEST_CASE("the daemon renews certificates and rotates keys by their policies, and warns before keys expire",
          "[fs][certificates][keys][policies]")
{
    MountOptions o;
    o.config_lines = {"object_policy_interval_seconds = 1"};
    Mount m(o);
    REQUIRE(make_dir(m.path("auto")).err == 0);
    REQUIRE(shell(cli(m, "cert create auto/short --subject CN=short --validity 8s --renew-at 50% --exportable")).err ==
            0);
    REQUIRE(shell(cli(m, "key create auto/rotating --rotate-after 3s")).err == 0);
    REQUIRE(shell(cli(m, "key create auto/expiring --expires-after 1h --notify-before 2h")).err == 0);
    CHECK(ok(read_file(m.path("auto/.certs/short/status"))).find("next_renewal: ") != std::string::npos);

    CHECK(eventually(20, [&] { return stat_path(m.path("auto/.certs/short@2")).err == 0; }));
    CHECK(eventually(20, [&] { return stat_path(m.path("auto/.keys/rotating@2")).err == 0; }));
    CHECK(eventually(10, [&] {
        for (const auto& rec : m.audit())
            if (rec["op"] == "key_near_expiry" && rec["secret"] == ".keys/expiring")
                return true;
        return false;
    }));
    bool renewed_by_policy = false, rotated_by_policy = false;
    int warnings = 0;
    for (const auto& rec : m.audit()) {
        renewed_by_policy |= rec["op"] == "cert_renew" && rec["rule"] == "renewal-policy" && rec["result"] == "ok";
        rotated_by_policy |= rec["op"] == "key_rotate" && rec["rule"] == "rotation-policy" && rec["result"] == "ok";
        warnings += rec["op"] == "key_near_expiry" ? 1 : 0;
    }
    CHECK(renewed_by_policy);
    CHECK(rotated_by_policy);
    CHECK(warnings == 1);  // once per version
    CHECK(m.daemon_stderr().find("expires at") != std::string::npos);
    // The renewed certificate is a fresh one for the same name.
    CHECK(shell("openssl x509 -noout -subject -in " + m.path("auto/.certs/short/cert.pem")).data == "subject=CN = short\n");
    CHECK(m.verify().err == 0);
}
