// README's tour, run as written: every command of its console block, in one
// shell, in order, with /var/lib/vaultfs and /vaults moved into a temporary
// directory. Each must succeed and print what the README shows (compared
// word by word: `ls` prints columns on a terminal, lines here).
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

struct Step {
    std::string command;
    std::vector<std::string> expected;  // lines the README shows after it
};

std::vector<std::string> words(const std::string& text)
{
    std::istringstream in(text);
    std::vector<std::string> out;
    for (std::string w; in >> w;)
        out.push_back(w);
    return out;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to)
{
    for (std::size_t at = 0; (at = s.find(from, at)) != std::string::npos; at += to.size())
        s.replace(at, from.size(), to);
    return s;
}

std::vector<Step> tour(const std::string& readme)
{
    std::ifstream in(readme);
    std::vector<Step> steps;
    std::string line;
    bool section = false, block = false;
    while (std::getline(in, line)) {
        if (line.rfind("## ", 0) == 0)
            section = line == "## A tour";
        else if (section && !block && line == "```console")
            block = true;
        else if (block && line == "```")
            break;
        else if (block && line.rfind("# ", 0) == 0)
            steps.push_back(Step{line.substr(2), {}});
        else if (block && !steps.empty())
            steps.back().expected.push_back(line);
    }
    return steps;
}

}  // namespace

TEST_CASE("README's tour runs as written and prints what it shows", "[fs][readme]")
{
    const char* readme = std::getenv("VAULTFS_README");
    REQUIRE(readme != nullptr);
    const auto steps = tour(readme);
    REQUIRE(steps.size() > 15);

    std::string tmpl = (std::filesystem::temp_directory_path() / "vaultfs-tour-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    const std::string work = tmpl;
    struct Remove {
        std::string work;
        ~Remove()
        {
            std::error_code ec;
            std::filesystem::remove_all(work, ec);
        }
    } remove{work};
    BackgroundDaemon daemon{work + "/vaults", work + "/state"};  // ends before `remove` runs
    REQUIRE(::mkdir((work + "/bin").c_str(), 0755) == 0);
    std::filesystem::copy_file(vaultfs_binary(), work + "/bin/vaultfs");

    // One shell for the whole tour (its `export` carries on), each command
    // framed so that its output and status can be told apart.
    std::string script = "cd " + work + "\n";
    for (std::size_t i = 0; i < steps.size(); ++i) {
        std::string cmd = replace_all(steps[i].command, "/var/lib/vaultfs", work + "/state");
        cmd = replace_all(cmd, "/vaults", work + "/vaults");
        cmd = replace_all(cmd, "$PWD/build/fs", work + "/bin");
        // In braces, not a subshell: `export` carries on; the newline ends
        // the README's trailing comment.
        script += "echo '@@@ " + std::to_string(i) + "'\n{ " + cmd + "\n} 2>&1\necho \"@@@ rc $?\"\n";
    }
    std::ofstream(work + "/tour.sh") << script;
    const auto run = shell("bash " + work + "/tour.sh");
    INFO(run.data);

    std::size_t at = 0;
    for (std::size_t i = 0; i < steps.size(); ++i) {
        const std::string marker = "@@@ " + std::to_string(i) + "\n";
        const auto begin = run.data.find(marker, at);
        REQUIRE(begin != std::string::npos);
        const auto rc = run.data.find("@@@ rc ", begin);
        REQUIRE(rc != std::string::npos);
        const std::string output = run.data.substr(begin + marker.size(), rc - begin - marker.size());
        const std::string status = run.data.substr(rc + 7, run.data.find('\n', rc) - rc - 7);
        at = rc;
        INFO("step " << i << ": " << steps[i].command << "\n" << output);
        CHECK(status == "0");
        if (!steps[i].expected.empty()) {
            std::string want;
            for (const auto& l : steps[i].expected)
                want += replace_all(replace_all(l, "/var/lib/vaultfs", work + "/state"), "/vaults", work + "/vaults") +
                        "\n";
            CHECK(words(output) == words(want));
        }
    }
}
