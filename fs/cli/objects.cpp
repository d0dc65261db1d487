#include "fs/cli/objects.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "fs/cli/support.hpp"
#include "vault/keys/key_vault.hpp"

namespace vaultfs::fs {

using json = nlohmann::json;

struct ObjectCommands::Options {
    std::string state;
    std::string socket;
    std::string target;  // VAULT/NAME[@N]
    // keys
    CLI::App* key = nullptr;
    CLI::App* cert = nullptr;
    CLI::App *key_create = nullptr, *key_rotate = nullptr, *key_policy = nullptr, *key_show = nullptr,
             *key_sign = nullptr, *key_verify = nullptr, *key_decrypt = nullptr, *key_unwrap = nullptr;
    std::string type = "ec-p256";
    std::string ops;
    std::string rotate_after, notify_before, expires_after;
    std::string alg, in, out, signature;
    bool raw = false;
    bool digest = false;
    // certificates
    CLI::App *cert_create = nullptr, *cert_renew = nullptr, *cert_merge = nullptr, *cert_import = nullptr,
             *cert_show = nullptr;
    std::string subject, sans, validity, key_type = "ec-p256", issuer = "self", renew_at, renew_before, file,
                                        password_file;
    int days = 0;
    bool exportable = false;
    bool ca = false;
};

namespace {

// "90d", "12h", "30m", "45s" or plain seconds; nullopt for anything else.
std::optional<std::int64_t> duration(const std::string& text)
{
    if (text.empty())
        return std::nullopt;
    std::int64_t n = 0;
    const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
    if (ec != std::errc() || n <= 0)
        return std::nullopt;
    const std::string unit(p, text.data() + text.size());
    if (unit.empty() || unit == "s")
        return n;
    if (unit == "m")
        return n * 60;
    if (unit == "h")
        return n * 3600;
    if (unit == "d")
        return n * 86400;
    return std::nullopt;
}

// Writes `data` to `path` (mode 0600, replacing it) or stdout for "-",
// checking every error.
int spill(const std::string& path, std::string_view data)
{
    const bool to_stdout = path == "-";
    const int fd = to_stdout ? STDOUT_FILENO : ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    std::size_t done = 0;
    while (fd >= 0 && done < data.size()) {
        const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        done += static_cast<std::size_t>(n);
    }
    if (fd < 0 || done != data.size() || (!to_stdout && ::close(fd) != 0))
        return fail("cannot write " + path + ": " + std::strerror(errno));
    return 0;
}

const EVP_MD* md_of(const std::string& alg)
{
    if (alg.ends_with("384"))
        return EVP_sha384();
    if (alg.ends_with("512"))
        return EVP_sha512();
    return EVP_sha256();
}

std::string hash(const std::string& alg, std::string_view data)
{
    std::string out(EVP_MAX_MD_SIZE, '\0');
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), reinterpret_cast<unsigned char*>(out.data()), &len, md_of(alg), nullptr);
    out.resize(len);
    return out;
}

// Splits VAULT/NAME[@N] into the request's args.
bool target_args(const std::string& target, json& args)
{
    const auto slash = target.find('/');
    if (slash == std::string::npos || slash == 0 || slash + 1 >= target.size())
        return false;
    args["vault"] = target.substr(0, slash);
    std::string name = target.substr(slash + 1);
    if (const auto at = name.find('@'); at != std::string::npos) {
        std::uint64_t n = 0;
        const auto [p, ec] = std::from_chars(name.data() + at + 1, name.data() + name.size(), n);
        if (ec != std::errc() || p != name.data() + name.size() || n == 0)
            return false;
        args["version"] = n;
        name.resize(at);
    }
    args["name"] = name;
    return true;
}

// JOSE r | s to the DER openssl reads, and back.
std::optional<std::string> raw_to_der(std::string_view raw)
{
    const std::size_t half = raw.size() / 2;
    ECDSA_SIG* sig = ECDSA_SIG_new();
    BIGNUM* r = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()), static_cast<int>(half), nullptr);
    BIGNUM* s = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()) + half, static_cast<int>(half), nullptr);
    ECDSA_SIG_set0(sig, r, s);
    const int len = i2d_ECDSA_SIG(sig, nullptr);
    std::string out(static_cast<std::size_t>(std::max(len, 0)), '\0');
    auto* p = reinterpret_cast<unsigned char*>(out.data());
    i2d_ECDSA_SIG(sig, &p);
    ECDSA_SIG_free(sig);
    return out;
}

bool verify(const std::string& pem, const std::string& alg, std::string_view data, std::string_view sig)
{
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    EVP_PKEY* key = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    if (key == nullptr)
        return false;
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX* pctx = nullptr;
    bool ok = EVP_DigestVerifyInit(ctx, &pctx, md_of(alg), nullptr, key) == 1;
    if (ok && alg.starts_with("PS"))
        ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) == 1;
    ok = ok && EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                                reinterpret_cast<const unsigned char*>(data.data()), data.size()) == 1;
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);
    return ok;
}

}  // namespace

ObjectCommands::ObjectCommands(CLI::App& app, const std::string& default_state) : o_(std::make_unique<Options>())
{
    auto& o = *o_;
    o.state = default_state;
    o.key = app.add_subcommand("key", "Keys held in the token: create, rotate, sign, decrypt (through the daemon)");
    o.key->require_subcommand(1);
    o.key_create = o.key->add_subcommand("create", "Generate a key in the token (needs create)");
    o.key_create->add_option("--type", o.type, "rsa-2048 rsa-3072 rsa-4096 ec-p256 ec-p384 ec-p521")
        ->capture_default_str();
    o.key_create->add_option("--ops", o.ops, "sign,verify,encrypt,decrypt,wrapkey,unwrapkey (default: all the type can)");
    o.key_rotate = o.key->add_subcommand("rotate", "Make a new version of a key (needs rotate)");
    o.key_policy = o.key->add_subcommand("policy", "Set a key's rotation policy (needs rotate)");
    for (auto* sub : {o.key_create, o.key_policy}) {
        sub->add_option("--rotate-after", o.rotate_after, "A new version when the current one is this old (90d, 12h, 30m, 45s)");
        sub->add_option("--notify-before", o.notify_before, "A near-expiry event this long before a version expires");
        sub->add_option("--expires-after", o.expires_after, "Each new version expires this long after it is made");
    }
    o.key_show = o.key->add_subcommand("show", "A key's type, operations, policy, versions and public key");
    o.key_sign = o.key->add_subcommand("sign", "Sign data (or a digest) with a key (needs sign)");
    o.key_verify = o.key->add_subcommand("verify", "Verify a signature locally with the key's public half");
    o.key_decrypt = o.key->add_subcommand("decrypt", "Decrypt data with a key (needs decrypt)");
    o.key_unwrap = o.key->add_subcommand("unwrap", "Unwrap a wrapped key with a key (needs unwrap)");
    for (auto* sub : {o.key_sign, o.key_verify, o.key_decrypt, o.key_unwrap}) {
        sub->add_option("--alg", o.alg, "ES256 ... PS512 (sign, verify); RSA-OAEP RSA-OAEP-256 RSA1_5 (decrypt, unwrap)")
            ->required();
        sub->add_option("--in", o.in, "Input file")->required();
    }
    for (auto* sub : {o.key_sign, o.key_decrypt, o.key_unwrap})
        sub->add_option("--out", o.out, "Output file (mode 0600), or - for stdout")->required();
    o.key_verify->add_option("--signature", o.signature, "The signature file")->required();
    for (auto* sub : {o.key_sign, o.key_verify}) {
        sub->add_flag("--raw", o.raw, "ECDSA signatures as JOSE r|s instead of DER");
        sub->add_flag("--digest", o.digest, "--in is the digest already, not the data");
    }

    auto* cert = o.cert = app.add_subcommand("cert", "Certificates: create, renew, merge, import (through the daemon)");
    cert->require_subcommand(1);
    o.cert_create = cert->add_subcommand("create", "Issue a certificate (needs create; a vault CA issuer needs sign on it)");
    o.cert_create->add_option("--subject", o.subject, "CN=web.example,O=Example")->required();
    o.cert_create->add_option("--san", o.sans, "DNS:web.example,IP:10.0.0.1");
    o.cert_create->add_option("--days", o.days, "Validity in days (default 365)");
    o.cert_create->add_option("--validity", o.validity, "Validity as a duration (90d, 12h, 10m, 30s)");
    o.cert_create->add_option("--key", o.key_type, "rsa-2048 ... ec-p521")->capture_default_str();
    o.cert_create->add_flag("--exportable", o.exportable, "Key made in software and kept encrypted: key.pem can be read");
    o.cert_create->add_flag("--ca", o.ca, "A CA certificate, to issue others with --issuer VAULT/NAME");
    o.cert_create->add_option("--issuer", o.issuer, "self, VAULT/CA-NAME or unknown (a CSR to merge)")
        ->capture_default_str();
    o.cert_create->add_option("--renew-at", o.renew_at, "Renew at this share of the validity (80%)");
    o.cert_create->add_option("--renew-before", o.renew_before, "Renew this long before it expires (30d)");
    o.cert_renew = cert->add_subcommand("renew", "Renew a certificate now (needs rotate)");
    o.cert_merge = cert->add_subcommand("merge", "Complete a pending certificate with the signed one (needs create)");

    o.cert_import = cert->add_subcommand("import", "Import a certificate and its key, PEM or PKCS#12 (needs create)");

    o.cert_import->add_option("--password-file", o.password_file, "The PKCS#12 password");
    o.cert_show = cert->add_subcommand("show", "A certificate's status, dates, files and versions");

    for (auto* sub : {o.key_create, o.key_rotate, o.key_policy, o.key_show, o.key_sign, o.key_verify, o.key_decrypt,
                      o.key_unwrap, o.cert_create, o.cert_renew, o.cert_merge, o.cert_import, o.cert_show}) {
        sub->add_option("target", o.target, "VAULT/NAME (VAULT/NAME@N for one version)")->required();
        sub->add_option("--state", o.state, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
        sub->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    }
    // After the target: positionals are taken in order.
    o.cert_merge->add_option("file", o.file, "The signed certificate (PEM, with its chain)")->required();
    o.cert_import->add_option("file", o.file, "PEM or PKCS#12 file")->required();
}

ObjectCommands::~ObjectCommands() = default;

std::optional<int> ObjectCommands::run(const ManageFn& manage)
{
    auto& o = *o_;
    if (!*o.key && !*o.cert)
        return std::nullopt;
    ControlRequest request;
    request.command = ControlRequest::Command::object;
    json args = json::object();
    if (!target_args(o.target, args))
        return fail("name a key or certificate as VAULT/NAME (or VAULT/NAME@N), not '" + o.target + "'");
    const auto send = [&](const std::string& op, const std::function<int(const json&)>& show) {
        request.op = op;
        request.args = args.dump();
        return manage(o.state, o.socket, request, show);
    };
    const auto policy_args = [&]() -> std::optional<std::string> {
        for (const auto& [key, text] : {std::pair{"rotate_after", o.rotate_after},
                                        std::pair{"notify_before", o.notify_before},
                                        std::pair{"expires_after", o.expires_after}}) {
            if (text.empty())
                continue;
            const auto s = duration(text);
            if (!s)
                return "'" + text + "' is not a duration (90d, 12h, 30m, 45s)";
            args[key] = *s;
        }
        return std::nullopt;
    };
    const auto print = [](const json& reply) {
        std::printf("%s\n", reply["result"].dump(2).c_str());
        return 0;
    };

    if (*o.key_create) {
        args["type"] = o.type;
        if (!o.ops.empty())
            args["ops"] = o.ops;
        if (auto bad = policy_args())
            return fail(*bad);
        return send("key_create", [&](const json& reply) {
            std::printf("created key %s version %llu in the token\n%s", o.target.c_str(),
                        static_cast<unsigned long long>(reply["result"].value("version", 0)),
                        reply["result"].value("public_pem", std::string()).c_str());
            return 0;
        });
    }
    if (*o.key_rotate)
        return send("key_rotate", [&](const json& reply) {
            std::printf("rotated %s: version %llu\n", o.target.c_str(),
                        static_cast<unsigned long long>(reply["result"].value("version", 0)));
            return 0;
        });
    if (*o.key_policy) {
        if (auto bad = policy_args())
            return fail(*bad);
        return send("key_policy", [&](const json&) {
            std::printf("rotation policy of %s set\n", o.target.c_str());
            return 0;
        });
    }
    if (*o.key_show)
        return send("key_show", print);
    if (*o.key_sign || *o.key_verify || *o.key_decrypt || *o.key_unwrap) {
        const auto input = slurp(o.in);
        if (!input)
            return fail("cannot read " + o.in + ": " + std::strerror(errno));
        if (*o.key_sign || *o.key_verify) {
            if (!vault::keys::sign_algorithm(o.alg))
                return fail("--alg is one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 ES512");
        } else if (!vault::keys::decrypt_algorithm(o.alg)) {
            return fail("--alg is one of RSA-OAEP RSA-OAEP-256 RSA1_5");
        }
        args["alg"] = o.alg;
        if (*o.key_verify) {
            if (o.digest)
                return fail("verify hashes --in itself; give it the data");
            auto sig = slurp(o.signature);
            if (!sig)
                return fail("cannot read " + o.signature + ": " + std::strerror(errno));
            if (o.raw)
                sig = raw_to_der(*sig);
            return send("key_show", [&](const json& reply) {
                if (verify(reply["result"].value("public_pem", std::string()), o.alg, *input, *sig)) {
                    std::printf("Verified OK\n");
                    return 0;
                }
                std::printf("Verification failure\n");
                return 1;
            });
        }
        if (*o.key_sign) {
            args["digest"] = base64_encode(o.digest ? *input : hash(o.alg, *input));
            return send("key_sign", [&](const json& reply) {
                auto sig = base64_decode(reply["result"].value("signature", std::string()));
                if (!sig)
                    return fail("the daemon sent an unreadable signature");
                if (o.raw && o.alg.starts_with("ES")) {
                    const auto type = hsm::key_type_from(reply["result"].value("type", std::string()));
                    const auto raw = vault::keys::ecdsa_der_to_raw(
                        std::span(reinterpret_cast<const std::uint8_t*>(sig->data()), sig->size()),
                        type.value_or(hsm::KeyType::ec_p256));
                    if (!raw)
                        return fail("the signature does not parse");
                    sig = std::string(raw->begin(), raw->end());
                }
                return spill(o.out, *sig);
            });
        }
        args["data"] = base64_encode(*input);
        args["unwrap"] = static_cast<bool>(*o.key_unwrap);
        return send("key_decrypt", [&](const json& reply) {
            auto plain = base64_decode(reply["result"].value("plaintext", std::string()));
            if (!plain)
                return fail("the daemon sent an unreadable reply");
            const int rc = spill(o.out, *plain);
            OPENSSL_cleanse(plain->data(), plain->size());
            return rc;
        });
    }
    const auto made = [&](const char* what) {
        return [&, what](const json& reply) {
            std::printf("%s %s: version %llu, %s\n", what, o.target.c_str(),
                        static_cast<unsigned long long>(reply["result"].value("version", 0)),
                        reply["result"].value("status", std::string()).c_str());
            return 0;
        };
    };
    if (*o.cert_create) {
        args["subject"] = o.subject;
        if (!o.sans.empty())
            args["sans"] = o.sans;
        if (o.days > 0 && !o.validity.empty())
            return fail("give --days or --validity, not both");
        if (o.days > 0)
            args["validity"] = static_cast<std::int64_t>(o.days) * 86400;
        if (!o.validity.empty()) {
            const auto s = duration(o.validity);
            if (!s)
                return fail("'" + o.validity + "' is not a duration (90d, 12h, 30m, 45s)");
            args["validity"] = *s;
        }
        args["key"] = o.key_type;
        args["exportable"] = o.exportable;
        args["ca"] = o.ca;
        args["issuer"] = o.issuer;
        if (!o.renew_at.empty() && !o.renew_before.empty())
            return fail("give --renew-at or --renew-before, not both");
        if (!o.renew_at.empty()) {
            int pct = 0;
            const auto [p, ec] = std::from_chars(o.renew_at.data(), o.renew_at.data() + o.renew_at.size(), pct);
            if (ec != std::errc() || std::string_view(p, o.renew_at.data() + o.renew_at.size() - p) != "%")
                return fail("--renew-at is a share of the validity, like 80%");
            args["renew_at_percent"] = pct;
        }
        if (!o.renew_before.empty()) {
            const auto s = duration(o.renew_before);
            if (!s)
                return fail("'" + o.renew_before + "' is not a duration (90d, 12h, 30m, 45s)");
            args["renew_before"] = *s;
        }
        return send("cert_create", made("created"));
    }
    if (*o.cert_renew)
        return send("cert_renew", made("renewed"));
    if (*o.cert_merge || *o.cert_import) {
        const auto data = slurp(o.file);
        if (!data || data->empty())
            return fail("cannot read " + o.file + (data ? " (it is empty)" : ": " + std::string(std::strerror(errno))));
        if (*o.cert_merge) {
            args["pem"] = *data;
            return send("cert_merge", made("merged"));
        }
        args["data"] = base64_encode(*data);
        if (!o.password_file.empty()) {
            auto pw = slurp(o.password_file);
            if (!pw)
                return fail("cannot read " + o.password_file + ": " + std::strerror(errno));
            while (!pw->empty() && (pw->back() == '\n' || pw->back() == '\r'))
                pw->pop_back();
            args["password"] = *pw;
        }
        return send("cert_import", made("imported"));
    }
    if (*o.cert_show)
        return send("cert_show", print);
    return std::nullopt;
}

}  // namespace vaultfs::fs
