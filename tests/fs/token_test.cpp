// Integration tests for tokens other than the embedded SoftHSM2 (docs/design.md
// §3, docs/keys-and-certificates.md "A token you already have (a hardware HSM)"): adopting a token its owner initialised, the
// constructions negotiated from its mechanisms, and moving a state between
// tokens with `vaultfs token migrate`. They need a second PKCS#11
// implementation, so they are hidden ([.ock]) and run in the
// fs-integration-opencryptoki suite, where tests/support/with-opencryptoki
// provides an openCryptoki soft token (which the suite's other states share:
// adopted tokens hold other objects too).
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "fs_support.hpp"

namespace vaultfs::testing {
namespace {

TestToken need_token()
{
    auto t = test_token();
    if (!t)
        FAIL("no second token: run under tests/support/with-opencryptoki (meson test fs-integration-opencryptoki)");
    return *t;
}

std::string conf_value(const Mount& m, const std::string& key)
{
    std::ifstream in(m.state_file("vaultfs.conf"));
    std::string line;
    while (std::getline(in, line))
        if (line.rfind(key + " = ", 0) == 0)
            return line.substr(key.size() + 3);
    return "";
}

std::string pkcs11_tool(const TestToken& t, const std::string& label, const std::string& pin_file,
                        const std::string& args)
{
    return "pkcs11-tool --module " + t.module + " --token-label " + label + " --login --pin \"$(cat " + pin_file +
           ")\" " + args + " 2>&1";
}

}  // namespace

TEST_CASE("init adopts a token its owner initialised, and names what it lacks", "[.ock][token]")
{
    const TestToken t = need_token();
    Mount scratch(MountOptions{{}, 8, false});  // a temp dir, nothing mounted
    const std::string bin = vaultfs_binary();

    // The owner's own object in the token, before vaultfs arrives.
    REQUIRE(shell(pkcs11_tool(t, t.label, t.pin_file,
                              "--keygen --key-type AES:32 --label owners-key --id 0102030405060708")).err == 0);

    SECTION("the PIN file must be private, the label must exist; a refused init leaves nothing")
    {
        const std::string loose = (scratch.root + "/" "loose.pin");
        REQUIRE(shell("cp " + t.pin_file + " " + loose + " && chmod 644 " + loose).err == 0);
        auto r = shell(bin + " init --state " + (scratch.root + "/" "a") + " --module " + t.module + " --token-label " + t.label +
                       " --pin-file " + loose + " 2>&1");
        CHECK(r.err == 1);
        CHECK_THAT(r.data, Catch::Contains("0600"));
        r = shell(bin + " init --state " + (scratch.root + "/" "a") + " --module " + t.module +
                  " --token-label no-such-token --pin-file " + t.pin_file + " 2>&1");
        CHECK(r.err == 1);
        CHECK(r.data == "vaultfs: no initialised token labelled 'no-such-token' in module " + t.module +
                            "; its tokens: pkcs11-tool --module " + t.module + " -L\n");
        CHECK_FALSE(std::filesystem::exists(scratch.root + "/" "a"));
        r = shell(bin + " init --state " + (scratch.root + "/" "a") + " --token-label " + t.label + " 2>&1");
        CHECK(r.err != 0);  // a label without a PIN file
        CHECK_FALSE(std::filesystem::exists(scratch.root + "/" "a"));
    }

    SECTION("adopted: the choice is printed and recorded, the owner's objects are untouched")
    {
        auto r = shell(bin + " init --state " + (scratch.root + "/" "st") + " --module " + t.module + " --token-label " + t.label +
                       " --pin-file " + t.pin_file + " 2>&1");
        INFO(r.data);
        REQUIRE(r.err == 0);
        const std::string name = "token '" + t.label + "' (IBM Corp. IBM SoftTok)";
        CHECK_THAT(r.data, Catch::Contains(name + " adopted as it is"));
        CHECK_THAT(r.data, Catch::Contains(name + " lacks CKM_AES_GCM; vaultfs will seal DEKs with AES-256-CBC-PAD + "
                                                  "HMAC-SHA256 (encrypt-then-MAC, two keys)"));
        CHECK_THAT(r.data, Catch::Contains(name + " lacks CKM_EC_KEY_PAIR_GEN and CKM_ECDSA for P-256; vaultfs will "
                                                  "sign the audit trail with RSA-PSS (RSA-3072, SHA-256)"));
        CHECK_THAT(r.data, Catch::Contains("audit-signing.pub.pem    public half of the audit signing key (RSA-3072"));
        CHECK(r.data.find("SoftHSM") == std::string::npos);
        // Nothing of SoftHSM2's in the state; the PIN stays where the owner keeps it.
        CHECK_FALSE(std::filesystem::exists(scratch.root + "/" "st/softhsm2.conf"));
        CHECK_FALSE(std::filesystem::exists(scratch.root + "/" "st/tokens"));
        CHECK_FALSE(std::filesystem::exists(scratch.root + "/" "st/pin"));
        const std::string conf = slurp(scratch.root + "/" "st/vaultfs.conf");
        CHECK_THAT(conf, Catch::Contains("token_seal = aes-cbc-pad+hmac-sha256\n"));
        CHECK_THAT(conf, Catch::Contains("token_signature = rsa-pss-sha256\n"));
        CHECK_THAT(conf, Catch::Contains("pin_source = file:" + t.pin_file + "\n"));
        CHECK(conf.find("module_env") == std::string::npos);
        // The owner's key is still there, beside vaultfs's.
        const auto objects = shell(pkcs11_tool(t, t.label, t.pin_file, "--list-objects"));
        CHECK_THAT(objects.data, Catch::Contains("owners-key"));
        CHECK_THAT(objects.data, Catch::Contains("ID:         0102030405060708"));
        CHECK_THAT(objects.data, Catch::Contains("vaultfs-audit-signing"));
        // A second init into the same token is another state with its own keys.
        r = shell(bin + " init --state " + (scratch.root + "/" "st2") + " --module " + t.module + " --token-label " + t.label +
                  " --pin-file " + t.pin_file + " 2>&1");
        CHECK(r.err == 0);
        CHECK(slurp(scratch.root + "/" "st/audit-signing.pub.pem") != slurp(scratch.root + "/" "st2/audit-signing.pub.pem"));
    }
}

TEST_CASE("a state whose recorded constructions the token lacks is not mounted, and the message says so",
          "[.ock][token]")
{
    const TestToken t = need_token();
    Mount m;
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/db"), "one").err == 0);
    m.stop();
    const std::string conf = m.state_file("vaultfs.conf");
    REQUIRE(shell("sed -i 's/^token_seal = .*/token_seal = aes-gcm/' " + conf).err == 0);
    auto r = m.start_expecting_failure();
    CHECK(r.err != 0);
    CHECK_THAT(r.data, Catch::Contains("token '" + t.label + "' (IBM Corp. IBM SoftTok) lacks CKM_AES_GCM, which this "
                                       "state's token_seal = aes-gcm needs; a state moves to a token with other "
                                       "mechanisms by `vaultfs token migrate`"));
    CHECK(r.data.find("SoftHSM") == std::string::npos);
    REQUIRE(shell("sed -i 's/^token_seal = .*/token_seal = aes-cbc-pad+hmac-sha256/' " + conf).err == 0);
    m.start();
    CHECK(ok(read_file(m.path("app/db"))) == "one");
}

TEST_CASE("on a token without EC, key create refuses EC keys by name; RSA keys sign and decrypt", "[token]")
{
    Mount m;
    REQUIRE(make_dir(m.path("app")).err == 0);
    auto r = shell(m.binary + " key create app/ec --type ec-p256 --ops sign --state " + m.state + " 2>&1");
    if (test_token()) {
        CHECK(r.err == 1);
        CHECK(r.data == "vaultfs: app/.keys/ec: token '" + test_token()->label +
                            "' (IBM Corp. IBM SoftTok) cannot make ec-p256 keys that sign: it lacks CKM_EC_KEY_PAIR_GEN "
                            "and CKM_ECDSA (EINVAL)\n");
        CHECK(list_dir(m.path("app/.keys/ec")).err == ENOENT);
        CHECK(m.last_audit("key_create", 0)["result"] == "EINVAL");
        const auto status = shell(m.binary + " status --state " + m.state);
        CHECK_THAT(status.data, Catch::Contains("\n         token '" + test_token()->label +
                                                "' (IBM Corp. IBM SoftTok); DEKs sealed with aes-cbc-pad+hmac-sha256, "
                                                "audit signed with rsa-pss-sha256\n"));
    } else {
        CHECK(r.err == 0);  // SoftHSM2 makes EC keys
        const auto status = shell(m.binary + " status --state " + m.state);
        CHECK_THAT(status.data, Catch::Contains("\n         token 'vaultfs' (SoftHSM project SoftHSM v2); DEKs sealed "
                                                "with aes-gcm, audit signed with ecdsa-p256\n"));
    }
    r = shell(m.binary + " key create app/rsa --type rsa-2048 --ops sign,decrypt --state " + m.state + " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    const std::string digest = m.root + "/digest";
    REQUIRE(shell("printf 'hello' | openssl dgst -sha256 -binary > " + digest).err == 0);
    REQUIRE(shell("openssl pkey -pubin -in " + m.path("app/.keys/rsa/public.pem") + " -out " + m.root + "/pub.pem").err ==
            0);
    for (const std::string alg : {"PS256", "RS256"}) {
        INFO(alg);
        const std::string sig = m.root + "/sig." + alg;
        r = shell(m.binary + " key sign app/rsa --alg " + alg + " --digest --in " + digest + " --out " + sig +
                  " --state " + m.state + " 2>&1");
        INFO(r.data);
        REQUIRE(r.err == 0);
        const std::string pad = alg == "PS256" ? " -pkeyopt rsa_padding_mode:pss -pkeyopt rsa_pss_saltlen:32" : "";
        CHECK(shell("openssl pkeyutl -verify -pubin -inkey " + m.root + "/pub.pem -in " + digest + " -sigfile " + sig +
                    " -pkeyopt digest:sha256" + pad)
                  .err == 0);
    }
    const std::string ct = m.root + "/ct";
    REQUIRE(shell("printf 'wrapped-secret' | openssl pkeyutl -encrypt -pubin -inkey " + m.root +
                  "/pub.pem -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -out " + ct)
                .err == 0);
    r = shell(m.binary + " key decrypt app/rsa --alg RSA-OAEP-256 --in " + ct + " --out - --state " + m.state);
    CHECK(r.err == 0);
    CHECK(r.data == "wrapped-secret");

    // Certificates too: a CA and a leaf whose keys stay in the token, signed
    // through libp11; an EC certificate key is refused like an EC key.
    const std::string certs = m.path("app/.certs");
    r = shell(m.binary + " cert create app/ca --subject CN=Token-CA --ca --key rsa-2048 --state " + m.state + " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    r = shell(m.binary + " cert create app/web --subject CN=web.test --key rsa-2048 --issuer app/ca --state " + m.state +
              " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK(shell("openssl verify -CAfile " + certs + "/ca/cert.pem " + certs + "/web/cert.pem").err == 0);
    r = shell(m.binary + " cert create app/ecweb --subject CN=ec.test --key ec-p256 --state " + m.state + " 2>&1");
    if (test_token()) {
        CHECK(r.err == 1);
        CHECK_THAT(r.data, Catch::Contains("cannot make ec-p256 keys that sign: it lacks CKM_EC_KEY_PAIR_GEN and "
                                           "CKM_ECDSA (EINVAL)"));
    } else {
        CHECK(r.err == 0);
    }
}

TEST_CASE("token migrate moves a state from SoftHSM2 to another token and back; the audit chain hands over",
          "[.ock][token]")
{
    const TestToken t = need_token();
    Mount m(MountOptions{.embedded_token = true});
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/db"), "one").err == 0);
    REQUIRE(write_file(m.path("app/db"), "two").err == 0);
    REQUIRE(write_file(m.path("app/api"), "key-1").err == 0);
    const std::string ciphertext_before =
        ok(shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT hex(ciphertext) FROM versions ORDER BY id'"));
    const std::string sealed_before =
        ok(shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT hex(sealed_dek) FROM versions ORDER BY id'"));
    const std::string migrate = m.binary + " token migrate --state " + m.state;

    SECTION("refused while the daemon serves the state")
    {
        auto r = shell(migrate + " --to-module " + t.module + " --to-token-label " + t.label + " --pin-file " +
                       t.pin_file + " 2>&1");
        CHECK(r.err == 1);
        CHECK_THAT(r.data, Catch::Contains("stop the daemon"));
        CHECK(conf_value(m, "token_label") == "vaultfs");
    }

    SECTION("SoftHSM2 -> openCryptoki -> SoftHSM2")
    {
        m.stop();
        auto r = shell(migrate + " --to-module " + t.module + " --to-token-label " + t.label + " --pin-file " +
                       t.pin_file + " 2>&1");
        INFO(r.data);
        REQUIRE(r.err == 0);
        CHECK_THAT(r.data, Catch::Contains("1 KEK(s) made in token '" + t.label + "' (IBM Corp. IBM SoftTok) under the "
                                           "same ids; 3 DEK(s) re-sealed token to token (aes-cbc-pad+hmac-sha256); no "
                                           "value was decrypted"));
        CHECK(conf_value(m, "pkcs11_module") == t.module);
        CHECK(conf_value(m, "token_label") == t.label);
        CHECK(conf_value(m, "token_seal") == "aes-cbc-pad+hmac-sha256");
        CHECK(conf_value(m, "token_signature") == "rsa-pss-sha256");
        CHECK(conf_value(m, "module_env.SOFTHSM2_CONF").empty());
        // Only sealed DEKs changed: the ciphertext is byte for byte the same.
        CHECK(ok(shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT hex(ciphertext) FROM versions ORDER BY id'")) ==
              ciphertext_before);
        CHECK(ok(shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT hex(sealed_dek) FROM versions ORDER BY id'")) !=
              sealed_before);
        CHECK_FALSE(std::filesystem::exists(m.state_file("vault.db.pre-migration")));
        auto v = m.verify();
        INFO(v.data);
        CHECK(v.err == 0);
        CHECK_THAT(v.data, Catch::StartsWith("OK:"));
        // One handover record, signed, naming both keys.
        const auto handover = m.last_audit("handover");
        CHECK(handover["token"] == "token '" + t.label + "' (IBM Corp. IBM SoftTok)");
        CHECK(handover["new_key"] == slurp(m.state_file("audit-signing.pub.pem")));
        CHECK(handover["old_key"] == slurp(m.state_file("audit-signing.pub.pem.before-migration")));

        m.start();
        CHECK(ok(read_file(m.path("app/db@1"))) == "one");
        CHECK(ok(read_file(m.path("app/db"))) == "two");
        CHECK(ok(read_file(m.path("app/api"))) == "key-1");
        REQUIRE(write_file(m.path("app/db"), "three").err == 0);
        CHECK(ok(read_file(m.path("app/db"))) == "three");
        m.stop();

        // And back to a SoftHSM2 token, which the module finds through SOFTHSM2_CONF.
        const std::string soft = m.root + "/softhsm";
        REQUIRE(shell("mkdir -p " + soft + "/tokens && printf 'directories.tokendir = " + soft +
                      "/tokens\\nobjectstore.backend = file\\n' > " + soft + "/softhsm2.conf && SOFTHSM2_CONF=" + soft +
                      "/softhsm2.conf softhsm2-util --init-token --free --label back --so-pin 12345678 --pin 87654321 "
                      ">/dev/null && printf 87654321 > " + soft + "/pin && chmod 600 " + soft + "/pin")
                    .err == 0);
        r = shell(migrate + " --to-module /usr/lib/softhsm/libsofthsm2.so --to-token-label back --pin-file " + soft +
                  "/pin --to-module-env SOFTHSM2_CONF=" + soft + "/softhsm2.conf 2>&1");
        INFO(r.data);
        REQUIRE(r.err == 0);
        CHECK_THAT(r.data, Catch::Contains("4 DEK(s) re-sealed token to token (aes-gcm)"));
        CHECK(conf_value(m, "token_seal") == "aes-gcm");
        CHECK(conf_value(m, "token_signature") == "ecdsa-p256");
        CHECK(conf_value(m, "module_env.SOFTHSM2_CONF") == soft + "/softhsm2.conf");
        m.start();
        CHECK(ok(read_file(m.path("app/db@1"))) == "one");
        CHECK(ok(read_file(m.path("app/db@2"))) == "two");
        CHECK(ok(read_file(m.path("app/db"))) == "three");
        CHECK(ok(read_file(m.path("app/api"))) == "key-1");
        m.stop();
        v = m.verify();
        INFO(v.data);
        CHECK(v.err == 0);
        std::size_t handovers = 0;
        for (const auto& rec : m.audit())
            handovers += rec["op"] == "handover" ? 1 : 0;
        CHECK(handovers == 2);

        // The chain is checked across the hand-overs. An edited handover
        // breaks it: without the hand-over, the records before it do not
        // verify under the key given.
        const std::string copy = m.root + "/audit-copy.jsonl";
        REQUIRE(shell("sed '0,/\"op\":\"handover\"/s/\"token\":\"token /\"token\":\"TOKEN /' " +
                      m.state_file("audit.jsonl") + " > " + copy).err == 0);
        v = shell(m.binary + " audit verify --public-key " + m.state_file("audit-signing.pub.pem") + " " + copy + " 2>&1");
        CHECK(v.err == 1);
        CHECK_THAT(v.data, Catch::Contains("audit-copy.jsonl line 1: forged init record: its signature does not verify"));
        // Verified with only the first key, the log does not reach it.
        v = shell(m.binary + " audit verify --public-key " + m.state_file("audit-signing.pub.pem.before-migration") +
                  " " + m.state_file("audit.jsonl") + " 2>&1");
        CHECK(v.err == 1);
        CHECK_THAT(v.data, Catch::Contains("the handover record hands over to a key that does not lead to the audit "
                                           "public key"));
    }
}

TEST_CASE("an interrupted token migrate leaves a state that refuses to mount until it is rolled back",
          "[.ock][token]")
{
    const TestToken t = need_token();
    Mount m(MountOptions{.embedded_token = true});
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/db"), "one").err == 0);
    REQUIRE(write_file(m.path("app/db"), "two").err == 0);
    m.stop();
    const std::string conf_before = slurp(m.state_file("vaultfs.conf"));
    const std::string sealed_before =
        ok(shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT hex(sealed_dek) FROM versions ORDER BY id'"));
    const std::string audit = m.state_file("audit.jsonl");
    const std::string migrate = m.binary + " token migrate --state " + m.state + " --to-module " + t.module +
                                " --to-token-label " + t.label + " --pin-file " + t.pin_file + " 2>&1";
    const auto unchanged = [&] {
        CHECK(slurp(m.state_file("vaultfs.conf")) == conf_before);
        CHECK(ok(shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT hex(sealed_dek) FROM versions ORDER BY id'")) ==
              sealed_before);
        CHECK(ok(shell("sqlite3 " + m.state_file("vault.db") + " \"SELECT count(*) FROM settings WHERE key = "
                       "'token_migration'\"")) == "0\n");
    };

    // The audit file cannot be opened once the DEKs are re-sealed: the
    // migration puts everything back itself.
    REQUIRE(shell("mv " + audit + " " + audit + ".saved && mkdir " + audit).err == 0);
    auto r = shell(migrate);
    INFO(r.data);
    CHECK(r.err == 1);
    CHECK_THAT(r.data, Catch::Contains("the state was put back as it was"));
    CHECK_FALSE(std::filesystem::exists(m.state_file("token-migration.pending")));
    unchanged();

    // As above, and putting back fails too (vaultfs.conf cannot be
    // rewritten): as after a crash, the state is marked.
    REQUIRE(shell("mkdir " + m.state_file("vaultfs.conf.new")).err == 0);
    r = shell(migrate);
    INFO(r.data);
    CHECK(r.err == 1);
    CHECK_THAT(r.data, Catch::Contains("putting the state back failed too"));
    CHECK_THAT(r.data, Catch::Contains("run `vaultfs token migrate --state " + m.state + " --roll-back`"));
    CHECK(std::filesystem::exists(m.state_file("token-migration.pending")));
    REQUIRE(shell("rmdir " + m.state_file("vaultfs.conf.new") + " " + audit + " && mv " + audit + ".saved " + audit)
                .err == 0);

    // Nothing opens it meanwhile, whatever its vaultfs.conf says.
    auto o = m.start_expecting_failure();
    CHECK(o.err != 0);
    CHECK_THAT(o.data, Catch::Contains("a `vaultfs token migrate` of " + m.state +
                                       " was interrupted; put the state back as it was with `vaultfs token migrate "
                                       "--state " + m.state + " --roll-back`, then migrate again"));
    r = shell(migrate);
    CHECK(r.err == 1);
    CHECK_THAT(r.data, Catch::Contains("was interrupted"));

    r = shell(m.binary + " token migrate --state " + m.state + " --roll-back 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK_THAT(r.data, Catch::Contains("put back as it was before the migration"));
    CHECK_THAT(r.data, Catch::Contains("token '" + t.label + "' (IBM Corp. IBM SoftTok) still holds what the migration "
                                       "made there: ids "));
    CHECK_FALSE(std::filesystem::exists(m.state_file("token-migration.pending")));
    unchanged();
    m.start();
    CHECK(ok(read_file(m.path("app/db@1"))) == "one");
    CHECK(ok(read_file(m.path("app/db"))) == "two");
    m.stop();
    auto v = m.verify();
    INFO(v.data);
    CHECK(v.err == 0);
    // A second roll-back finds nothing to do.
    r = shell(m.binary + " token migrate --state " + m.state + " --roll-back 2>&1");
    CHECK(r.err == 0);
    CHECK(r.data == "no interrupted migration: the state is as its vaultfs.conf says\n");
}

TEST_CASE("token migrate refuses a state whose key pairs live in the old token, and changes nothing", "[.ock][token]")
{
    const TestToken t = need_token();
    Mount m(MountOptions{.embedded_token = true});
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/db"), "one").err == 0);
    REQUIRE(shell(m.binary + " key create app/signer --type rsa-2048 --ops sign --state " + m.state).err == 0);
    m.stop();
    const std::string db_before = ok(shell("sha256sum < " + m.state_file("vault.db")));
    const std::string audit_before = slurp(m.state_file("audit.jsonl"));
    const std::string conf_before = slurp(m.state_file("vaultfs.conf"));
    const std::string count_before =
        ok(shell(pkcs11_tool(t, t.label, t.pin_file, "--list-objects") + " | grep -c 'Object\\|Key Object' || true"));
    auto r = shell(m.binary + " token migrate --state " + m.state + " --to-module " + t.module + " --to-token-label " +
                   t.label + " --pin-file " + t.pin_file + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data == "vaultfs: the state holds key pairs that live in token 'vaultfs' and can never leave it: "
                    "app/.keys/signer@1; nothing was changed\n");
    CHECK(ok(shell("sha256sum < " + m.state_file("vault.db"))) == db_before);
    CHECK(slurp(m.state_file("audit.jsonl")) == audit_before);
    CHECK(slurp(m.state_file("vaultfs.conf")) == conf_before);
    CHECK(ok(shell(pkcs11_tool(t, t.label, t.pin_file, "--list-objects") + " | grep -c 'Object\\|Key Object' || true")) ==
          count_before);
    m.start();
    CHECK(ok(read_file(m.path("app/db"))) == "one");
}

}  // namespace vaultfs::testing
