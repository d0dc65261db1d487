// p11-attack: the attacker of tests/support/token_attack.hpp as a program,
// so that integration tests can aim it at a daemon's real token (in the
// daemon's own module configuration, or inside with-opencryptoki's
// namespace). Prints one JSON document.
//
//   p11-attack --module M --label L --pin-file F [--env NAME=VALUE]... keys
//   p11-attack ... trust
//   p11-attack ... unwrap TRANSPORT_ID_HEX WRAPPED_HEX
//   p11-attack ... plant-exposed-kek KEK_ID_HEX
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/support/token_attack.hpp"

int main(int argc, char** argv)
{
    using nlohmann::json;
    vaultfs::testing::TokenAccess t;
    std::vector<std::string> rest;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (i + 1 < argc && a == "--module")
            t.module = argv[++i];
        else if (i + 1 < argc && a == "--label")
            t.label = argv[++i];
        else if (i + 1 < argc && a == "--pin-file") {
            std::ifstream in(argv[++i]);
            std::stringstream ss;
            ss << in.rdbuf();
            t.pin = ss.str();
            while (!t.pin.empty() && (t.pin.back() == '\n' || t.pin.back() == '\r'))
                t.pin.pop_back();
        } else if (i + 1 < argc && a == "--env") {
            const std::string kv = argv[++i];
            t.environment.emplace_back(kv.substr(0, kv.find('=')), kv.substr(kv.find('=') + 1));
        } else
            rest.push_back(a);
    }
    try {
        json out;
        if (rest.size() == 1 && rest[0] == "keys") {
            out = json::array();
            for (const auto& k : vaultfs::testing::attack_every_key(t))
                out.push_back({{"id", k.id},
                               {"label", k.label},
                               {"class", k.cls},
                               {"value_rv", k.value_rv},
                               {"wrap_aes_rv", k.wrap_aes_rv},
                               {"wrap_rsa_rv", k.wrap_rsa_rv},
                               {"recovered_bytes", k.recovered_bytes}});
        } else if (rest.size() == 1 && rest[0] == "trust") {
            const auto r = vaultfs::testing::attack_trust(t);
            out = {{"own_key_rv", r.own_key_rv}, {"copy_rvs", r.copy_rvs}};
        } else if (rest.size() == 2 && rest[0] == "plant-exposed-kek") {
            out = {{"rv", vaultfs::testing::plant_exposed_kek(t, rest[1])}};
        } else if (rest.size() == 3 && rest[0] == "unwrap") {
            std::vector<unsigned char> blob;
            for (std::size_t i = 0; i + 1 < rest[2].size(); i += 2)
                blob.push_back(static_cast<unsigned char>(std::stoi(rest[2].substr(i, 2), nullptr, 16)));
            const auto r = vaultfs::testing::attack_unwrap(t, rest[1], blob);
            out = {{"unwrap_rv", r.unwrap_rv}, {"value_rv", r.value_rv}};
        } else {
            std::cerr << "usage: p11-attack --module M --label L --pin-file F [--env K=V]... keys|trust|unwrap ID HEX|plant-exposed-kek ID\n";
            return 2;
        }
        std::cout << out.dump() << "\n";
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "p11-attack: " << e.what() << "\n";
        return 1;
    }
}
