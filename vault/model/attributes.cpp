#include "vault/model/attributes.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <ctime>

namespace vaultfs::vault {

namespace {

bool digits(std::string_view s, std::size_t pos, std::size_t n, int& out)
{
    if (pos + n > s.size())
        return false;
    out = 0;
    for (std::size_t i = pos; i < pos + n; ++i) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        out = out * 10 + (s[i] - '0');
    }
    return true;
}

bool leap(int y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

int days_in_month(int y, int m)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && leap(y) ? 29 : days[m - 1];
}

}  // namespace

std::optional<Micros> parse_rfc3339(std::string_view s)
{
    int year, month, day, hour, minute, second;
    if (s.size() < 20 || !digits(s, 0, 4, year) || s[4] != '-' || !digits(s, 5, 2, month) || s[7] != '-' ||
        !digits(s, 8, 2, day) || (s[10] != 'T' && s[10] != 't') || !digits(s, 11, 2, hour) || s[13] != ':' ||
        !digits(s, 14, 2, minute) || s[16] != ':' || !digits(s, 17, 2, second))
        return std::nullopt;
    if (year < 1970 || month < 1 || month > 12 || day < 1 || day > days_in_month(year, month) || hour > 23 ||
        minute > 59 || second > 59)
        return std::nullopt;
    std::size_t pos = 19;
    Micros fraction = 0;
    if (s[pos] == '.') {
        ++pos;
        std::size_t n = 0;
        Micros scale = 100000;
        while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
            if (n < 6) {
                fraction += (s[pos] - '0') * scale;
                scale /= 10;
            }
            ++n;
            ++pos;
        }
        if (n == 0 || n > 9)
            return std::nullopt;
    }
    if (pos + 1 != s.size() || (s[pos] != 'Z' && s[pos] != 'z'))
        return std::nullopt;
    std::tm tm{};
    tm.tm_year = year - 1900;
    tm.tm_mon = month - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = minute;
    tm.tm_sec = second;
    const std::time_t t = ::timegm(&tm);
    return static_cast<Micros>(t) * 1000000 + fraction;
}

std::string format_rfc3339(Micros t)
{
    const std::time_t secs = static_cast<std::time_t>(t / 1000000);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    char buf[64];
    if (t % 1000000 == 0)
        std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                      tm.tm_hour, tm.tm_min, tm.tm_sec);
    else
        std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                      tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(t % 1000000));
    return buf;
}

std::optional<bool> parse_bool(std::string_view text)
{
    if (text == "true")
        return true;
    if (text == "false")
        return false;
    return std::nullopt;
}

std::string format_bool(bool b) { return b ? "true" : "false"; }

bool is_valid_content_type(std::string_view text)
{
    return text.size() <= max_content_type &&
           std::all_of(text.begin(), text.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
}

bool is_valid_tag_name(std::string_view text)
{
    return !text.empty() && text.size() <= max_tag_name &&
           std::all_of(text.begin(), text.end(), [](char c) { return c > 0x20 && c <= 0x7e; });
}

bool is_valid_tag_value(std::string_view text)
{
    return text.size() <= max_tag_value && std::all_of(text.begin(), text.end(), [](char c) {
               const auto u = static_cast<unsigned char>(c);
               return u >= 0x20 && u != 0x7f;
           });
}

std::optional<std::uint32_t> parse_mode(std::string_view text)
{
    std::uint32_t mode = 0;
    if (text.empty() || text.size() > 4)
        return std::nullopt;
    const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), mode, 8);
    if (ec != std::errc() || p != text.data() + text.size() || mode > 0777)
        return std::nullopt;
    return mode;
}

std::string format_mode(std::uint32_t mode)
{
    char buf[8];
    std::snprintf(buf, sizeof buf, "%04o", mode & 0777u);
    return buf;
}

}  // namespace vaultfs::vault
