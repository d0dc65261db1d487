#include "vault/store/postgresql.hpp"

#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <regex>

namespace vaultfs::vault::pg {

namespace {

// Type OIDs (pg_type.dat): the only three the schema uses, and the narrower
// integers some expressions produce.
constexpr Oid bool_oid = 16, bytea_oid = 17, int8_oid = 20, int2_oid = 21, int4_oid = 23, text_oid = 25;

std::string trimmed(const char* s)
{
    std::string out = s != nullptr ? s : "";
    while (!out.empty() && (out.back() == '\n' || out.back() == ' '))
        out.pop_back();
    return out;
}

Error error_of(PGconn* conn, const PGresult* res, const std::string& what)
{
    const char* state = res != nullptr ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : nullptr;
    std::string message = what + ": " + trimmed(res != nullptr ? PQresultErrorMessage(res) : PQerrorMessage(conn));
    if (message.size() == what.size() + 2)
        message += trimmed(PQerrorMessage(conn));
    const std::string code = state != nullptr ? state : "";
    if (code == "23505")
        return Error{Errc::already_exists, std::move(message)};
    if (code == "53100")
        return Error{Errc::no_space, std::move(message)};
    return Error{Errc::storage, "PostgreSQL: " + std::move(message)};
}

// `?` (numbered left to right) and `?N` become `$N`; quoted text is kept.
std::string dollar_parameters(const char* sql)
{
    std::string out;
    int next = 0;
    bool quoted = false;
    for (const char* p = sql; *p != '\0'; ++p) {
        if (*p == '\'')
            quoted = !quoted;
        if (quoted || *p != '?') {
            out += *p;
            continue;
        }
        if (p[1] >= '0' && p[1] <= '9') {
            out += '$';
            continue;  // the digits follow as they are
        }
        out += '$' + std::to_string(++next);
    }
    return out;
}

std::uint64_t big_endian(const char* p, int n)
{
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i)
        v = v << 8 | static_cast<unsigned char>(p[i]);
    return v;
}

}  // namespace

class Statement final : public db::Statement {
public:
    Statement(Connection& owner, PGconn* conn, std::string name, std::string sql)
        : owner_(owner), conn_(conn), name_(std::move(name)), sql_(std::move(sql))
    {
    }
    ~Statement() override { reset(); }

    void bind_int64(int index, std::int64_t v) override
    {
        auto& p = slot(index, int8_oid);
        p.value.resize(8);
        const auto u = static_cast<std::uint64_t>(v);
        for (int i = 0; i < 8; ++i)
            p.value[static_cast<std::size_t>(i)] = static_cast<char>(u >> (56 - 8 * i));
    }
    void bind_text(int index, std::string_view v) override { slot(index, text_oid).value.assign(v); }
    void bind_blob(int index, std::span<const std::uint8_t> v) override
    {
        slot(index, bytea_oid).value.assign(reinterpret_cast<const char*>(v.data()), v.size());
    }
    void bind_null(int index, db::Type type) override
    {
        const Oid oid = type == db::Type::integer ? int8_oid
                        : type == db::Type::text  ? text_oid
                        : type == db::Type::blob  ? bytea_oid
                                                  : 0;  // the server infers it
        slot(index, oid).null = true;
    }

    Result<bool> step() override
    {
        if (result_ == nullptr) {
            if (auto r = execute(); !r)
                return tl::unexpected(r.error());
        }
        ++row_;
        return row_ < PQntuples(result_);
    }

    bool is_null(int column) const override { return PQgetisnull(result_, row_, column) != 0; }
    std::int64_t int64(int column) const override
    {
        if (is_null(column))
            return 0;
        const char* v = PQgetvalue(result_, row_, column);
        switch (PQftype(result_, column)) {
        case int8_oid:
            return static_cast<std::int64_t>(big_endian(v, 8));
        case int4_oid:
            return static_cast<std::int32_t>(big_endian(v, 4));
        case int2_oid:
            return static_cast<std::int16_t>(big_endian(v, 2));
        case bool_oid:
            return v[0] != 0;
        default:
            return 0;
        }
    }
    std::string text(int column) const override
    {
        return std::string(PQgetvalue(result_, row_, column),
                           static_cast<std::size_t>(PQgetlength(result_, row_, column)));
    }
    std::vector<std::uint8_t> blob(int column) const override
    {
        const auto* p = reinterpret_cast<const std::uint8_t*>(PQgetvalue(result_, row_, column));
        return std::vector<std::uint8_t>(p, p + PQgetlength(result_, row_, column));
    }
    int column_count() const override { return PQnfields(result_); }
    std::string column_name(int column) const override { return PQfname(result_, column); }
    std::optional<db::Type> column_type(int column) const override
    {
        if (is_null(column))
            return std::nullopt;
        const Oid t = PQftype(result_, column);
        if (t == bytea_oid)
            return db::Type::blob;
        if (t == int8_oid || t == int4_oid || t == int2_oid || t == bool_oid)
            return db::Type::integer;
        return db::Type::text;
    }
    void reset() override
    {
        if (result_ != nullptr)
            PQclear(result_);
        result_ = nullptr;
        row_ = -1;
        for (auto& p : params_) {
            p.null = false;
            p.value.clear();
        }
    }

private:
    struct Param {
        Oid type = 0;
        bool null = false;
        std::string value;
    };
    Param& slot(int index, Oid type)
    {
        if (params_.size() < static_cast<std::size_t>(index))
            params_.resize(static_cast<std::size_t>(index));
        auto& p = params_[static_cast<std::size_t>(index - 1)];
        p.type = type;
        p.null = false;
        return p;
    }

    Result<void> execute()
    {
        const int n = static_cast<int>(params_.size());
        if (!prepared_) {
            std::vector<Oid> types;
            for (const auto& p : params_)
                types.push_back(p.type);
            auto sent = owner_.await("cannot prepare statement", [&] {
                return PQsendPrepare(conn_, name_.c_str(), sql_.c_str(), n, types.data());
            });
            if (!sent)
                return tl::unexpected(sent.error());
            PGresult* r = *sent;
            const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
            Error e = ok ? Error{} : error_of(conn_, r, "cannot prepare statement");
            PQclear(r);
            if (!ok)
                return tl::unexpected(std::move(e));
            prepared_ = true;
        }
        std::vector<const char*> values;
        std::vector<int> lengths, formats;
        for (const auto& p : params_) {
            values.push_back(p.null ? nullptr : p.value.data());
            lengths.push_back(static_cast<int>(p.value.size()));
            formats.push_back(1);
        }
        auto sent = owner_.await("query failed", [&] {
            return PQsendQueryPrepared(conn_, name_.c_str(), n, values.data(), lengths.data(), formats.data(), 1);
        });
        if (!sent)
            return tl::unexpected(sent.error());
        result_ = *sent;
        const auto status = PQresultStatus(result_);
        if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) {
            Error e = error_of(conn_, result_, "query failed");
            PQclear(result_);
            result_ = nullptr;
            return tl::unexpected(std::move(e));
        }
        return {};
    }

    Connection& owner_;
    PGconn* conn_;
    const std::string name_;
    const std::string sql_;
    bool prepared_ = false;
    std::vector<Param> params_;
    PGresult* result_ = nullptr;
    int row_ = -1;
};

std::string redact(const std::string& conninfo)
{
    static const std::regex url_password(R"(^(postgres(ql)?://[^:/@]*):[^@]*@)");
    static const std::regex kv_password(R"((^|\s)password\s*=\s*('[^']*'|\S+))");
    std::string out = std::regex_replace(conninfo, url_password, "$1:***@");
    return std::regex_replace(out, kv_password, "$1password=***");
}

bool is_conninfo(const std::string& s)
{
    return s.rfind("postgresql://", 0) == 0 || s.rfind("postgres://", 0) == 0 ||
           s.find("host=") != std::string::npos || s.find("dbname=") != std::string::npos;
}

namespace {

// What is left until `deadline`, for poll(): -1 without one, 0 once passed.
int remaining_ms(std::optional<Deadline> deadline)
{
    if (!deadline)
        return -1;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - std::chrono::steady_clock::now());
    return left.count() <= 0 ? 0 : static_cast<int>(left.count());
}

// Waits for `events` on `fd` until the deadline. false: it passed.
Result<bool> wait_for(int fd, short events, std::optional<Deadline> deadline)
{
    for (;;) {
        pollfd pfd{fd, events, 0};
        const int n = ::poll(&pfd, 1, remaining_ms(deadline));
        if (n > 0)
            return true;
        if (n == 0)
            return false;
        if (errno != EINTR)
            return fail(Errc::storage, std::string("poll on the PostgreSQL connection failed: ") + std::strerror(errno));
    }
}

}  // namespace

Result<std::unique_ptr<Connection>> Connection::open(const std::string& conninfo, std::optional<Deadline> deadline)
{
    // Defaults first: what the connection string says overrides them.
    const char* keys[] = {"connect_timeout", "tcp_user_timeout", "keepalives_idle", "keepalives_interval",
                          "keepalives_count", "application_name", "dbname", nullptr};
    const char* values[] = {"3", "5000", "5", "2", "2", "vaultfs", conninfo.c_str(), nullptr};
    PGconn* c = nullptr;
    if (!deadline) {
        c = PQconnectdbParams(keys, values, 1);
    } else {
        // Within the deadline, whatever the server does: a stopped server's
        // kernel still completes the TCP handshake, and then nothing comes.
        c = PQconnectStartParams(keys, values, 1);
        PostgresPollingStatusType state = PGRES_POLLING_WRITING;
        while (c != nullptr && PQstatus(c) != CONNECTION_BAD && state != PGRES_POLLING_OK &&
               state != PGRES_POLLING_FAILED) {
            auto ready = wait_for(PQsocket(c), state == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline);
            if (!ready || !*ready) {
                PQfinish(c);
                return fail(Errc::storage, "cannot connect to PostgreSQL at " + redact(conninfo) + ": " +
                                               (ready ? std::string("no answer within the deadline")
                                                      : ready.error().message));
            }
            state = PQconnectPoll(c);
        }
    }
    if (c == nullptr)
        return fail(Errc::out_of_memory, "libpq cannot allocate a connection");
    if (PQstatus(c) != CONNECTION_OK) {
        std::string why = trimmed(PQerrorMessage(c));
        PQfinish(c);
        return fail(Errc::storage, "cannot connect to PostgreSQL at " + redact(conninfo) + ": " + why);
    }
    // Notices (e.g. "relation already exists, skipping") are not errors.
    PQsetNoticeProcessor(c, [](void*, const char*) {}, nullptr);
    // Every call waits in poll() (await), never in libpq's blocking reads.
    if (PQsetnonblocking(c, 1) != 0) {
        std::string why = trimmed(PQerrorMessage(c));
        PQfinish(c);
        return fail(Errc::storage, "cannot use PostgreSQL at " + redact(conninfo) + " without blocking: " + why);
    }
    return std::unique_ptr<Connection>(new Connection(c));
}

Result<PGresult*> Connection::await(const char* what, const std::function<int()>& send)
{
    if (dead_)
        return fail(Errc::storage, std::string("PostgreSQL: ") + what + ": the session was dropped");
    const auto lost = [&](std::string why) -> tl::unexpected<Error> {
        dead_ = true;
        return tl::unexpected(Error{Errc::storage, "PostgreSQL: " + std::string(what) + ": " + std::move(why)});
    };
    const auto late = [&]() -> tl::unexpected<Error> {
        // Nothing of this session can be trusted any more (a reply may still
        // come, to a request nobody waits for): it is dropped, and the next
        // use opens another.
        return lost("no answer within " + std::to_string(budget_ms_) +
                    " ms (the server is stopped, unreachable, or a lock is held); the session is dropped");
    };
    if (send() == 0)
        return lost(trimmed(PQerrorMessage(conn_)));
    for (;;) {
        const int f = PQflush(conn_);
        if (f == 0)
            break;
        if (f < 0)
            return lost(trimmed(PQerrorMessage(conn_)));
        auto ready = wait_for(PQsocket(conn_), POLLOUT | POLLIN, deadline_);
        if (!ready)
            return lost(ready.error().message);
        if (!*ready)
            return late();
        if (PQconsumeInput(conn_) == 0)
            return lost(trimmed(PQerrorMessage(conn_)));
    }
    // Every result of the command; the first error, or else the last.
    PGresult* kept = nullptr;
    for (;;) {
        while (PQisBusy(conn_) != 0) {
            auto ready = wait_for(PQsocket(conn_), POLLIN, deadline_);
            if (!ready || !*ready) {
                if (kept != nullptr)
                    PQclear(kept);
                return ready ? late() : lost(ready.error().message);
            }
            if (PQconsumeInput(conn_) == 0) {
                if (kept != nullptr)
                    PQclear(kept);
                return lost(trimmed(PQerrorMessage(conn_)));
            }
        }
        PGresult* r = PQgetResult(conn_);
        if (r == nullptr)
            break;
        const auto status = PQresultStatus(r);
        const bool failed = status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK;
        if (kept == nullptr || (failed && PQresultStatus(kept) != PGRES_FATAL_ERROR)) {
            if (kept != nullptr)
                PQclear(kept);
            kept = r;
        } else {
            PQclear(r);
        }
    }
    if (kept == nullptr)
        return lost(trimmed(PQerrorMessage(conn_)));
    return kept;
}

void Connection::set_deadline(std::optional<Deadline> deadline)
{
    deadline_ = deadline;
    budget_ms_ = deadline ? std::max<long long>(0, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                       *deadline - std::chrono::steady_clock::now())
                                                       .count())
                          : 0;
}

Connection::~Connection()
{
    forget_statements();
    PQfinish(conn_);
}

Result<void> Connection::exec(const char* sql)
{
    auto sent = await("statement failed", [&] { return PQsendQuery(conn_, sql); });
    if (!sent)
        return tl::unexpected(sent.error());
    PGresult* r = *sent;
    const auto status = PQresultStatus(r);
    const bool ok = status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK;
    Error e = ok ? Error{} : error_of(conn_, r, "statement failed");
    PQclear(r);
    if (!ok)
        return tl::unexpected(std::move(e));
    return {};
}

bool Connection::in_transaction() const
{
    const auto s = PQtransactionStatus(conn_);
    return s == PQTRANS_INTRANS || s == PQTRANS_INERROR || s == PQTRANS_ACTIVE;
}

bool Connection::broken() const { return dead_ || PQstatus(conn_) != CONNECTION_OK; }

std::string Connection::server() const
{
    return std::string(PQhost(conn_) != nullptr ? PQhost(conn_) : "?") + ":" +
           (PQport(conn_) != nullptr ? PQport(conn_) : "?");
}

Result<bool> Connection::wait_notification(std::chrono::milliseconds timeout)
{
    const auto drain = [&] {
        bool any = false;
        while (PGnotify* n = PQnotifies(conn_)) {
            any = true;
            PQfreemem(n);
        }
        return any;
    };
    if (drain())
        return true;
    pollfd pfd{PQsocket(conn_), POLLIN, 0};
    if (pfd.fd < 0)
        return fail(Errc::storage, "PostgreSQL: the listening connection is closed");
    const int n = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
    if (n < 0)
        return fail(Errc::storage, std::string("poll on the PostgreSQL connection failed: ") + std::strerror(errno));
    if (n == 0)
        return false;
    if (PQconsumeInput(conn_) == 0)
        return fail(Errc::storage, "PostgreSQL: " + trimmed(PQerrorMessage(conn_)));
    return drain();
}

Result<std::unique_ptr<db::Statement>> Connection::prepare(const char* sql)
{
    return std::unique_ptr<db::Statement>(new Statement(*this, conn_, "vaultfs_" + std::to_string(++statements_),
                                                        dollar_parameters(sql)));
}

}  // namespace vaultfs::vault::pg
