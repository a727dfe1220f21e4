package envoycfg

import "testing"

// TestExtProcFilters: the rendered configuration keeps the ext_proc
// filters each option asks for; the observer, which has a name of its
// own, goes for another response mode and for an Envoy-only baseline.
func TestExtProcFilters(t *testing.T) {
	for _, tc := range []struct {
		name string
		path string
		o    Options
		want int
	}{
		{"as shipped: routing, observer and end", "../../deploy/envoy.yaml", Options{}, 3},
		{"without the end filter: routing and observer", "../../deploy/envoy.yaml", Options{WithoutEnd: true}, 2},
		{"streamed responses: routing only", "../../deploy/envoy.yaml", Options{Response: "streamed"}, 1},
		{"estimate: routing only", "../../deploy/envoy.yaml", Options{Response: "estimate"}, 1},
		{"Envoy-only baseline: none", "../../deploy/envoy-override-host.yaml", Options{Policy: "LEAST_REQUEST"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := Render(tc.path, tc.o)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := parse(tc.path, out)
			if err != nil {
				t.Fatal(err)
			}
			hcm := get(get(cfg, "static_resources", "listeners", 0), "filter_chains", 0, "filters", 0, "typed_config").(map[string]any)
			n := 0
			for _, f := range hcm["http_filters"].([]any) {
				if isExtProc(f.(map[string]any)) {
					n++
				}
			}
			if n != tc.want {
				t.Fatalf("%d ext_proc filters, want %d", n, tc.want)
			}
		})
	}
}
