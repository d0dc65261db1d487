// reply: what a Filesystem handler answers (one variant per fuse_reply_*),
// shared by the files that implement the handlers. Private to fs/.
#pragma once

#include <sys/statvfs.h>

#include <memory>
#include <string>
#include <variant>

#include "fs/fuse/errno_map.hpp"
#include "fs/fuse/filesystem.hpp"

namespace vaultfs::fs {

// A record's time (microseconds since the epoch) as a stat time.
inline timespec to_timespec(vault::Micros t)
{
    return timespec{static_cast<time_t>(t / 1000000), static_cast<long>((t % 1000000) * 1000)};
}

// What a handler answers; sent by the dispatcher with exactly one
// fuse_reply_* call.
struct Filesystem::Reply {
    struct Error {
        int code;
    };
    struct None {};
    struct Entry {
        fuse_entry_param e;
    };
    struct Attr {
        struct stat st;
        double timeout;
    };
    struct Open {
        fuse_file_info fi;
    };
    struct Create {
        fuse_entry_param e;
        fuse_file_info fi;
    };
    struct Buffer {
        const void* data;
        std::size_t size;
        std::shared_ptr<const void> keep_alive;  // owner of `data` (wiped when it goes, if secret)
    };
    struct Written {
        std::size_t count;
    };
    struct Statfs {
        struct statvfs st;
    };
    struct XattrSize {
        std::size_t size;
    };
    struct Init {};
    struct Link {
        std::string target;
    };
    struct Poll {
        unsigned revents;
    };
    std::variant<Error, None, Entry, Attr, Open, Create, Buffer, Written, Statfs, XattrSize, Init, Link, Poll> v;

    static Reply err(int code) { return Reply{Error{code}}; }
    static Reply err(const vault::Error& e) { return Reply{Error{to_errno(e.code)}}; }
    static Reply ok() { return Reply{Error{0}}; }
};

using Reply = Filesystem::Reply;

}  // namespace vaultfs::fs
