// Integration-test support: a real vaultfs mount in a temporary directory,
// real users and groups, and actions performed as those users in child
// processes (so the kernel, not the test, reports who is asking).
//
// Every object cleans up in its destructor, also when a test fails:
// the daemon is stopped by pid (SIGTERM, then SIGKILL), the mount is
// removed (lazily if needed), users, groups and directories are deleted.
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

// Tests that must enter namespaces from a single-threaded process cannot
// run under ThreadSanitizer (its runtime keeps a thread in every child).
// Their tags carry this: under TSan they are hidden -- Catch2 2.13's way of
// skipping -- so they are neither run nor counted as passed.
#if defined(__SANITIZE_THREAD__)
#define VAULTFS_SINGLE_THREADED_ONLY "[.][skipped-under-tsan]"
#else
#define VAULTFS_SINGLE_THREADED_ONLY ""
#endif

namespace vaultfs::testing {

// What an action in a child process produced: errno (0 = success) and data.
struct Outcome {
    int err = 0;
    std::string data;
};

class TestGroup {
public:
    explicit TestGroup(const std::string& tag);
    ~TestGroup();
    TestGroup(const TestGroup&) = delete;
    TestGroup& operator=(const TestGroup&) = delete;
    std::string name;
    gid_t gid = 0;
};

class TestUser {
public:
    // A new system user (no home, no login) in `groups`.
    explicit TestUser(const std::string& tag, const std::vector<const TestGroup*>& groups = {});
    ~TestUser();
    TestUser(const TestUser&) = delete;
    TestUser& operator=(const TestUser&) = delete;
    std::string name;
    uid_t uid = 0;
    gid_t gid = 0;
    std::vector<gid_t> groups;
};

// Runs `action` in a child process with the user's uid, gid and groups.
Outcome as(const TestUser& user, const std::function<Outcome()>& action);
// Runs `action` in a child process as root (for a fresh pid and clean fds).
Outcome as_root(const std::function<Outcome()>& action);

// A child process that acts in two steps as `user` (root when null): `first`
// runs at once; then the child holds what it opened until finish() lets
// `second` run. Meanwhile the test acts as others. The child is killed if
// the test ends first.
class Paused {
public:
    Paused(const TestUser* user, std::function<Outcome()> first, std::function<Outcome()> second);
    ~Paused();
    Paused(const Paused&) = delete;
    Paused& operator=(const Paused&) = delete;
    const Outcome& first() const { return first_; }
    Outcome finish();

private:
    pid_t pid_ = -1;
    int results_ = -1;  // child -> test
    int go_ = -1;       // test -> child
    Outcome first_;
};

// Actions (run them inside as()); each reports the first failing errno.
Outcome read_file(const std::string& path);
Outcome write_file(const std::string& path, const std::string& data, int flags = 0);  // 0: O_WRONLY|O_CREAT|O_TRUNC
Outcome list_dir(const std::string& path);  // names joined by '\n', sorted, without . and ..
Outcome stat_path(const std::string& path);  // data: size
Outcome make_dir(const std::string& path);
Outcome remove_dir(const std::string& path);
Outcome remove_file(const std::string& path);
Outcome rename_path(const std::string& from, const std::string& to);
Outcome get_xattr(const std::string& path, const std::string& name);
Outcome set_xattr(const std::string& path, const std::string& name, const std::string& value);
Outcome list_xattr(const std::string& path);  // names joined by '\n', sorted

// The data of a successful outcome; fails the test (with the errno) otherwise.
std::string ok(const Outcome& o);

// The whole content of a file ("" when it cannot be read).
std::string slurp(const std::string& path);

// Waits up to `seconds` for `done` (looking every 200 ms).
bool eventually(int seconds, const std::function<bool()>& done);

// Runs a shell command as root; returns its exit status and stdout.
Outcome shell(const std::string& command);

// The end of the last range `audit verify` output names as unproven (its
// "acknowledge --through N"), or 0 when it names none.
std::uint64_t unproven_through(const std::string& verify_output);

struct MountOptions {
    std::vector<std::string> config_lines;  // appended to vaultfs.conf
    unsigned threads = 8;
    bool init = true;  // run `vaultfs init` first
    // Runs the daemon under this command (e.g. unshare into namespaces of
    // its own); it must pass SIGTERM on to the daemon.
    std::vector<std::string> wrapper;
    // `vaultfs init` adopts the token named by $VAULTFS_TEST_TOKEN_MODULE,
    // _LABEL and _PIN_FILE when they are set (tests/support/with-opencryptoki
    // sets them: the suite's [token] tests run on a second PKCS#11
    // implementation); true keeps the embedded SoftHSM2 default regardless.
    bool embedded_token = false;
};

class Mount {
public:
    explicit Mount(MountOptions options = {});
    ~Mount();
    Mount(const Mount&) = delete;
    Mount& operator=(const Mount&) = delete;

    // Starts the daemon and waits for the mount; throws (with the daemon's
    // stderr) if it exits first.
    void start();
    // SIGTERM, wait, unmount if needed.
    void stop();
    // SIGKILL: leaves a stale mount behind, as a crash does.
    void kill_daemon();
    // Starts the daemon and returns its exit status and stderr (for start-up
    // failures; waits until it exits).
    Outcome start_expecting_failure();

    std::string path(const std::string& rel = "") const { return rel.empty() ? mountpoint : mountpoint + "/" + rel; }
    std::string state_file(const std::string& name) const { return state + "/" + name; }
    std::string daemon_stderr() const;
    bool mounted() const;
    pid_t daemon_pid() const { return pid_; }

    // All audit records, parsed.
    std::vector<nlohmann::json> audit() const;
    // The last audit record with this op (and, if given, this uid); throws if none.
    nlohmann::json last_audit(const std::string& op, std::optional<uid_t> uid = std::nullopt) const;
    // The records `action` appends.
    std::vector<nlohmann::json> records_of(const std::function<void()>& action) const;
    // `vaultfs audit verify --state`: its exit status and output.
    Outcome verify() const;
    std::size_t audit_count() const { return audit().size(); }

    std::string root;        // temp dir holding everything
    std::string state;       // root/state
    std::string mountpoint;  // root/mnt
    std::string binary;      // root/vaultfs: a copy of the executable every uid can run

private:
    MountOptions options_;
    pid_t pid_ = -1;
    std::string stderr_path_;
};

// Moves an initialised, stopped mount's audit file into `dir` (a small
// tmpfs, for a full disk) and points vaultfs.conf at it, with `extra`
// config lines; start() the mount afterwards.
void move_audit_to(const Mount& m, const std::string& dir, const std::string& extra = "");

// A daemon started by a test without -f (it detaches): when this goes, the
// mount is lifted and the daemon that holds `state` (its pid is in
// STATE/lock) is asked to end.
struct BackgroundDaemon {
    std::string mountpoint;
    std::string state;
    ~BackgroundDaemon();
};

std::string vaultfs_binary();

// The attacker of tests/support/token_attack.hpp (tests/support/p11_attack.cpp)
// aimed at the state's token with the state's own user PIN, as a root shell
// or a copy of the state directory would: its JSON answer to `command`
// ("keys", "trust", "unwrap ID HEX", "plant-exposed-kek ID").
nlohmann::json p11_attack(const std::string& state, const std::string& command);

// PKCS#11 return values the attacks expect.
inline constexpr unsigned long ckr_ok = 0x0;
inline constexpr unsigned long ckr_attribute_read_only = 0x10;
inline constexpr unsigned long ckr_attribute_sensitive = 0x11;
inline constexpr unsigned long ckr_key_not_wrappable = 0x69;
inline constexpr unsigned long ckr_key_unextractable = 0x6a;
inline constexpr unsigned long ckr_template_inconsistent = 0xd1;

// The token the suite runs on besides SoftHSM2, from the environment
// tests/support/with-opencryptoki sets; nullopt when there is none.
struct TestToken {
    std::string module, label, pin_file, name;
};
std::optional<TestToken> test_token();
std::string random_hex(std::size_t bytes);

}  // namespace vaultfs::testing
