#include "vault/store/db.hpp"

namespace vaultfs::vault::db {

Result<Query> Connection::query(const char* sql)
{
    auto it = by_pointer_.find(sql);
    if (it == by_pointer_.end()) {
        auto prepared = prepare(sql);
        if (!prepared)
            return tl::unexpected(prepared.error());
        it = by_pointer_.emplace(sql, std::move(*prepared)).first;
    }
    return Query(it->second.get());
}

Result<Query> Connection::query(const std::string& sql)
{
    auto it = by_text_.find(sql);
    if (it == by_text_.end()) {
        auto prepared = prepare(sql.c_str());
        if (!prepared)
            return tl::unexpected(prepared.error());
        it = by_text_.emplace(sql, std::move(*prepared)).first;
    }
    return Query(it->second.get());
}

}  // namespace vaultfs::vault::db
